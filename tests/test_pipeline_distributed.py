"""Two CPU ranks under torchrun (Gloo): features and k-means assignment split across ranks equal one
process; DDP training with the model-parallel loss resumes bitwise from a mid-run checkpoint; a run
whose weights turn NaN on one rank stops on both, saving nothing."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")
pytest.importorskip("faiss")

from unicom import atomic  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.features import FeatureStore  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from unicom import atomic, config, dist
    from unicom.train import DivergedError
    from unicom.cluster import ClusterConfig, run
    from unicom.features import FeaturesConfig, extract
    from unicom.train import TrainConfig, train

    root, phase = sys.argv[1], sys.argv[2]
    common = dict(data=f"{root}/imgs", num_workers=0, device="cpu")
    tcfg = dict(common, pseudo_labels=f"{root}/clusters", arch="open_clip:{name}",
                model_config=f"{root}/{name}.json", embedding_dim=16, batch_size=8, max_steps=6, warmup_steps=1,
                class_sample_rate=0.5, log_every=1, checkpoint_every=100, progress=False)
    if phase == "first":
        extract(config.make(FeaturesConfig, dict(common, output_dir=f"{root}/feats", model="pixels", mode="image",
                                                  shard_size=10, dtype="float32", pixel_size=4)), quiet=True)
        run(config.make(ClusterConfig, dict(features_dir=f"{root}/feats", output_dir=f"{root}/clusters",
                                            num_clusters=6, device="cpu")), quiet=True)
        train(config.make(TrainConfig, dict(tcfg, output_dir=f"{root}/a")))
        train(config.make(TrainConfig, dict(tcfg, output_dir=f"{root}/b", checkpoint_every=3, stop_after=3)))
        train(config.make(TrainConfig, dict(tcfg, output_dir=f"{root}/r", loss_parallel="replicated", max_steps=2)))
        # Rank 1 alone gets a NaN prototype after the last update: both ranks must stop, none save.
        def poison(optimizer, args, kwargs):
            if optimizer.state_dict()["state"][0]["step"] == 2 and dist.td.get_rank() == 1:
                group = next(g for g in optimizer.param_groups if g["name"] == "prototypes")
                with torch.no_grad():
                    group["params"][0].view(-1)[0] = float("nan")
        hook = register_optimizer_step_post_hook(poison)
        try:
            train(config.make(TrainConfig, dict(tcfg, output_dir=f"{root}/d", loss_parallel="replicated",
                                                max_steps=2)))
        except DivergedError as exc:
            atomic.write_text(f"{root}/d/diverged{dist.td.get_rank()}", str(exc))
        hook.remove()
    else:
        train(config.make(TrainConfig, dict(tcfg, output_dir=f"{root}/b", resume=True)))
    dist.cleanup()
    """
).replace("{name}", TINY_NAME)


def torchrun(root, phase):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(root / "script.py"),
        str(root),
        phase,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        image = rng.integers(0, 40, (8, 8), dtype=np.uint8)
        image[:, i % 4 * 2 : i % 4 * 2 + 2] = 220
        Image.fromarray(image, mode="L").save(tmp_path / "imgs" / f"{i:03d}.png")
    atomic.write_json(tmp_path / f"{TINY_NAME}.json", TINY_CLIP)
    (tmp_path / "script.py").write_text(SCRIPT)
    torchrun(tmp_path, "first")
    torchrun(tmp_path, "resume")

    feats = FeatureStore(tmp_path / "feats")
    assert len(feats) == 40 and feats.ids == [f"{i:03d}.png" for i in range(40)]
    assert len(feats.index["shards"]) == 4  # 2 per rank
    # One process, same centroids: the same labels as the two-rank assignment.
    from unicom.cluster import Assigner, drop_small

    raw = Assigner(np.load(tmp_path / "clusters" / "centroids_all.npy"))(feats.rows())[0]
    np.testing.assert_array_equal(drop_small(raw, 6, 1)[0], np.load(tmp_path / "clusters" / "labels.npy"))

    a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for rank in (0, 1):  # each rank owns and checkpoints its own block of prototypes
        ca = torch.load(tmp_path / "a" / "checkpoints" / "step_0000006" / f"rank{rank:05d}.pt", weights_only=False)
        cb = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006" / f"rank{rank:05d}.pt", weights_only=False)
        assert torch.equal(ca["criterion"]["weight"], cb["criterion"]["weight"])
    assert (tmp_path / "r" / "final.pt").is_file()
    for rank in (0, 1):
        assert "the weights after step 2 became NaN" in (tmp_path / "d" / f"diverged{rank}").read_text()
    assert not (tmp_path / "d" / "final.pt").exists() and not (tmp_path / "d" / "checkpoints").exists()
