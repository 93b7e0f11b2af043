"""Training: a few steps lower the loss; --resume from a mid-run checkpoint is bitwise exact (CPU)."""

import importlib
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")

from unicom import atomic, config  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.evaluate import EvaluateConfig, evaluate  # noqa: E402
from unicom.train import TrainConfig, latest_checkpoint, load_trained, read_metrics, train  # noqa: E402
from unicom.train import main as train_main  # noqa: E402

train_module = importlib.import_module("unicom.train")


def write_bar_images(root, classes: int, per_class: int, bar: int = 2):
    """``root/imgs/class<c>/<i>.png``: noisy 8x8 images, a bright bar at a different column per
    class (no captions), and the tiny ViT config beside them; returns ``root``."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            image = rng.integers(0, 60, (8, 8), dtype=np.uint8)
            image[:, bar * c : bar * c + 2] = 230
            path = root / "imgs" / f"class{c}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(path)
    atomic.write_json(root / f"{TINY_NAME}.json", TINY_CLIP)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 classes of 12 images (see :func:`write_bar_images`) + the tiny ViT config."""
    return write_bar_images(tmp_path_factory.mktemp("train"), 4, 12)


def make_cfg(root, out, **kw):
    values = dict(
        data=str(root / "imgs"),
        output_dir=str(out),
        arch=f"open_clip:{TINY_NAME}",
        model_config=str(root / f"{TINY_NAME}.json"),
        embedding_dim=16,
        batch_size=16,
        max_steps=24,
        lr=2e-3,
        warmup_steps=2,
        class_sample_rate=1.0,
        dim_sample_rate=0.5,
        scale=16.0,
        num_workers=0,
        log_every=1,
        checkpoint_every=100,
        progress=False,
        device="cpu",
        crop_scale=0.6,
    )
    values.update(kw)
    return config.make(TrainConfig, values)


def test_loss_goes_down_and_model_evaluates(dataset, tmp_path, one_thread):
    result = train(make_cfg(dataset, tmp_path / "run"))
    loss = read_metrics(tmp_path / "run")["loss"]
    assert len(loss) == 24 and result["num_classes"] == 4
    assert loss[-4:].mean() < 0.8 * loss[:4].mean()
    assert (tmp_path / "run" / "final.pt").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    metrics = evaluate(
        EvaluateConfig(data=str(dataset / "imgs"), checkpoint=str(tmp_path / "run"), num_workers=0, device="cpu"),
        progress=False,
    )
    assert 0.0 <= metrics["recall@1"] <= 1.0 and metrics["queries"] == 48
    untrained = load_trained(tmp_path / "run", weights=False)
    trained = load_trained(tmp_path / "run")
    assert not torch.equal(untrained.head.weight, trained.head.weight)


def test_resume_is_bitwise_identical(dataset, tmp_path, one_thread):
    # 48 images / 16 = 3 batches per epoch; stopping at step 4 is mid-epoch.
    straight = make_cfg(dataset, tmp_path / "a", max_steps=8)
    train(straight)
    interrupted = make_cfg(dataset, tmp_path / "b", max_steps=8, checkpoint_every=4, stop_after=4)
    train(interrupted)
    assert not (tmp_path / "b" / "final.pt").exists()
    assert latest_checkpoint(tmp_path / "b").parent.name == "step_0000004"
    train(config.make(TrainConfig, {**vars(interrupted), "stop_after": None, "resume": True}))
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca = torch.load(latest_checkpoint(tmp_path / "a"), weights_only=False)
    cb = torch.load(latest_checkpoint(tmp_path / "b"), weights_only=False)
    assert torch.equal(ca["criterion"]["weight"], cb["criterion"]["weight"])
    np.testing.assert_array_equal(read_metrics(tmp_path / "a")["loss"], read_metrics(tmp_path / "b")["loss"])
    with pytest.raises(config.ConfigError, match="'lr'"):
        train(config.make(TrainConfig, {**vars(interrupted), "stop_after": None, "resume": True, "lr": 0.5}))


def test_retune_resumes_with_new_rates_and_keeps_the_rest(dataset, tmp_path, one_thread):
    """A diverged (or too slow) run goes on from its checkpoint with new optimiser settings, only when asked."""
    out = tmp_path / "run"
    first = make_cfg(dataset, out, max_steps=8, checkpoint_every=4, stop_after=4, weight_decay=0.05)
    train(first)
    lower = {**vars(first), "stop_after": None, "resume": True, "lr": 5e-4, "warmup_steps": 6, "weight_decay": 0.1}
    with pytest.raises(config.ConfigError, match=r"'lr', 'warmup_steps', 'weight_decay'.*may change with retune"):
        train(config.make(TrainConfig, lower))
    with pytest.raises(config.ConfigError, match="'embedding_dim'"):  # not an optimiser setting
        train(config.make(TrainConfig, {**lower, "retune": True, "embedding_dim": 8}))
    with pytest.raises(config.ConfigError, match="'retune'.*set resume"):
        config.make(TrainConfig, {**vars(first), "retune": True})
    used = []  # the rates each optimiser step of the resumed run really applies
    hook = register_optimizer_step_pre_hook(lambda o, a, k: used.append([g["lr"] for g in o.param_groups]))
    try:
        train(config.make(TrainConfig, {**lower, "retune": True}))
    finally:
        hook.remove()
    # Steps 5..8 (schedule steps 4..7) with lr 5e-4 and 6 warmup steps; prototypes at 10x.
    want = [5e-4 * train_module.lr_factor(s, 8, 6, 0.0) for s in range(4, 8)]
    np.testing.assert_allclose(np.array(used), np.array(want)[:, None] * [1, 1, 10], rtol=1e-6)
    metrics = read_metrics(out)  # each row logs the rate of the step after it
    np.testing.assert_array_equal(metrics["step"], np.arange(1, 9))
    old = [2e-3 * train_module.lr_factor(s, 8, 2, 0.0) for s in range(1, 5)]
    np.testing.assert_allclose(metrics["lr"], [*old, *want[1:], 0.0], rtol=1e-5, atol=1e-12)
    saved = torch.load(latest_checkpoint(out), weights_only=False)
    assert [g["initial_lr"] for g in saved["optimizer"]["param_groups"]] == [5e-4, 5e-4, 5e-3]
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.1, 0.0, 0.0]
    assert saved["config"]["lr"] == 5e-4 and saved["scheduler"]["base_lrs"] == [5e-4, 5e-4, 5e-3]
    assert saved["optimizer"]["state"][0]["step"] == 8  # the moments went on, not restarted


@pytest.fixture()
def poison(monkeypatch):
    """``poison(group, after)``: once the optimizer has made step ``after``, one weight of the named
    parameter group (``backbone`` or ``prototypes``) becomes NaN, as a diverging update would leave it."""
    steps, handles = [], []

    def arm(group: str, after: int) -> None:
        def hook(optimizer, args, kwargs):
            steps.append(None)
            if len(steps) == after:
                params = next(g["params"] for g in optimizer.param_groups if g["name"] == group)
                with torch.no_grad():
                    params[0].view(-1)[0] = float("nan")

        handles.append(register_optimizer_step_post_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    "group, after, log_every, stopped, newest",
    [
        # NaN prototypes: the loss of step 6 is NaN, found where its window ends (step 6).
        ("prototypes", 5, 3, r"the loss of a step in 5\.\.6 became NaN", "step_0000004"),
        # NaN weights after step 4 with a finite loss: found before checkpoint 4 is written.
        ("backbone", 4, 1, r"a step in 4\.\.4 or the weights after step 4 became NaN", None),
        # NaN backbone: the loss refuses the NaN embeddings of step 6.
        ("backbone", 5, 1, r"the embeddings of step 6 contain NaN or inf, so the weights after step 5", "step_0000004"),
    ],
)
def test_a_diverging_run_stops_before_a_checkpoint_keeps_its_nans(
    dataset, tmp_path, one_thread, poison, group, after, log_every, stopped, newest
):
    """Without the check the run trained on and its NaN checkpoints replaced the finite ones."""
    poison(group, after)
    out = tmp_path / "run"
    cfg = make_cfg(dataset, out, max_steps=12, checkpoint_every=4, keep_checkpoints=1, log_every=log_every)
    with pytest.raises(train_module.DivergedError, match=stopped) as err:
        train(cfg)
    assert isinstance(err.value, config.UserError)  # the command ends with one line and status 2
    assert f"the newest is {'none' if newest is None else ''}" in str(err.value)
    assert not (out / "final.pt").exists()
    latest = latest_checkpoint(out)
    assert (latest is None) if newest is None else (latest.parent.name == newest)
    if latest is not None:
        state = torch.load(latest, weights_only=False)
        for weights in (state["model"], state["criterion"]):
            tensors = [t for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_a_trained_model_loads_with_the_normalisation_it_trained_with(dataset, tmp_path, one_thread, monkeypatch):
    """The mean/std are decided from the weights' names when the model is built; should that rule give
    other values when the run is loaded (a changed rule, an open_clip update), the checkpoint's win."""
    train(make_cfg(dataset, tmp_path / "run", max_steps=2))
    trained = load_trained(tmp_path / "run")
    build = train_module.build_model

    def other_rule(*args, **kwargs):
        model = build(*args, **kwargs)
        model.mean = model.std = (0.5, 0.5, 0.5)
        return model

    monkeypatch.setattr(train_module, "build_model", other_rule)
    for path in (tmp_path / "run", latest_checkpoint(tmp_path / "run")):
        loaded = load_trained(path)
        assert (loaded.mean, loaded.std, loaded.image_size) == (trained.mean, trained.std, trained.image_size)
        assert loaded.mean != (0.5, 0.5, 0.5)


def test_bad_training_input(dataset, tmp_path):
    with pytest.raises(config.ConfigError, match="batch_size"):
        train(make_cfg(dataset, tmp_path / "c", batch_size=64))
    with pytest.raises(Exception, match="pseudo-label file not found"):
        train(make_cfg(dataset, tmp_path / "c", pseudo_labels=str(tmp_path / "none")))
    with pytest.raises(Exception, match="arch must be"):
        train(make_cfg(dataset, tmp_path / "c", arch="resnet"))


@pytest.fixture()
def no_model(monkeypatch):
    """Fail loudly if the model is built: the errors under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(train_module, "build_model", refuse)


def test_num_classes_below_the_largest_label_is_refused_at_start(dataset, tmp_path, no_model):
    with pytest.raises(config.ConfigError, match=r"'num_classes' is 2, but .* holds label 3.*at least 4"):
        train(make_cfg(dataset, tmp_path / "c", num_classes=2))


def write_cls_shards(root, shards=2, per=8, classes=4):
    """Webdataset shards ``root/s-N.tar`` of 8x8 PNGs with ``.cls`` labels ``0..classes-1`` in turn."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(root / f"s-{s}.tar", "w") as tar:
            for i in range(per):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(buffer, format="PNG")
                for ext, data in (("png", buffer.getvalue()), ("cls", str((s * per + i) % classes).encode())):
                    info = tarfile.TarInfo(f"{s}_{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_stream_label_above_num_classes_is_a_config_error(dataset, tmp_path, one_thread):
    """A stream reads its own labels only while training: the batch holding one of no class stops the run
    with an error naming num_classes, not the loss' traceback."""
    shards = write_cls_shards(tmp_path / "shards")
    cfg = make_cfg(dataset, tmp_path / "c", data=str(shards), data_mode="stream", num_classes=2, batch_size=4)
    with pytest.raises(config.ConfigError, match=r"'num_classes' is 2, but the shards .* hold label [23]"):
        train(cfg)


def cluster_folder(path, labels, centroids):
    atomic.save_npy(path / "labels.npy", labels)
    atomic.save_npy(path / "centroids.npy", centroids)
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["labels.npy", "centroids.npy"])
def test_damaged_pseudo_label_files_are_named(dataset, tmp_path, no_model, name):
    folder = cluster_folder(tmp_path / "cl", np.arange(48, dtype=np.int32) % 4, np.zeros((4, 16), np.float32))
    truncate(folder / name)
    with pytest.raises(DataError, match=rf"cl/{name} is damaged or unreadable") as err:
        train(make_cfg(dataset, tmp_path / "c", pseudo_labels=str(folder)))
    assert "\n" not in str(err.value)


def test_damaged_pseudo_labels_end_the_command_with_status_2(dataset, tmp_path, no_model, capsys):
    folder = cluster_folder(tmp_path / "cl", np.arange(48, dtype=np.int32) % 4, np.zeros((4, 16), np.float32))
    truncate(folder / "labels.npy")
    argv = ["--data", str(dataset / "imgs"), "--output-dir", str(tmp_path / "c"), "--pseudo-labels", str(folder)]
    with pytest.raises(SystemExit) as exc:
        train_main([*argv, "--device", "cpu", "--num-workers", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("unicom-train: error: ") and err.count("\n") == 1 and "labels.npy" in err


def test_pseudo_labels_beyond_the_centroids_are_refused(dataset, tmp_path, no_model):
    """labels.npy and centroids.npy of two runs: a label with no centroid is named, before the model."""
    folder = cluster_folder(tmp_path / "cl", np.arange(48, dtype=np.int32) % 4, np.zeros((3, 16), np.float32))
    with pytest.raises(config.ConfigError, match=r"'num_classes' is 3 .* holds label 3"):
        train(make_cfg(dataset, tmp_path / "c", pseudo_labels=str(folder)))


def test_bad_images_are_ignored_and_counted_when_asked(dataset, tmp_path):
    import shutil

    from unicom.data import DataError

    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    (root / "imgs" / "class1" / "03.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="class1/03.png"):
        train(make_cfg(root, tmp_path / "strict", max_steps=3))
    train(make_cfg(root, tmp_path / "lenient", max_steps=3, skip_bad=True))
    assert read_metrics(tmp_path / "lenient")["skipped"][-1] == 1  # one epoch = 3 steps covers every image


def test_damaged_tar_samples_are_counted_in_indexed_mode_too(dataset, tmp_path, one_thread):
    """A sample found damaged while indexing (here a .cls that is no integer) has no label; it was
    left out of the epoch uncounted, while the stream of the same data counted it."""
    shards = write_cls_shards(tmp_path / "shards")
    with tarfile.open(shards / "s-0.tar", "a") as tar:
        for ext, data in (("png", b"\x89PNG"), ("cls", b"x")):
            info = tarfile.TarInfo(f"0_999.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skipped = {}
    for mode in ("indexed", "stream"):
        cfg = make_cfg(
            dataset, tmp_path / mode, data=str(shards), data_mode=mode, num_classes=4, batch_size=17, max_steps=1,
            skip_bad=True,
        )  # fmt: skip
        train(cfg)
        skipped[mode] = read_metrics(tmp_path / mode)["skipped"][-1]
    assert skipped == {"indexed": 1, "stream": 1}


def test_a_single_tar_is_joined_to_the_features_by_its_name(tmp_path):
    """One tar of the same size as the one the features came from, but another: its pseudo-labels were
    those of the other tar, silently (the stream refuses it)."""
    from unicom.data import wds_source
    from unicom.stream import ShardTable

    shards = write_cls_shards(tmp_path / "shards", shards=1)
    (shards / "s-0.tar").rename(shards / "other.tar")
    ShardTable(["s-0.tar"], np.array([8]), np.array([0]), np.array([8])).save(tmp_path / "feats")
    folder = cluster_folder(tmp_path / "cl", np.arange(8, dtype=np.int32) % 4, np.zeros((4, 16), np.float32))
    cfg = make_cfg(tmp_path, tmp_path / "out", pseudo_labels=str(folder), features_dir=str(tmp_path / "feats"))
    with pytest.raises(DataError, match="other.tar is not in the shard table"):
        train_module.indexed_labels(cfg, wds_source(str(shards / "other.tar")))
    (shards / "other.tar").rename(shards / "s-0.tar")  # the right tar, wherever it lives
    labels, _ = train_module.indexed_labels(cfg, wds_source(str(shards / "s-0.tar")))
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_resume_on_other_data_is_refused_moved_data_is_not(dataset, tmp_path, one_thread):
    """'data' and 'pseudo_labels' may move between a run and its resume; another set of samples or
    labels used to resume silently into a run that no uninterrupted one would give."""
    shards = write_cls_shards(tmp_path / "shards", shards=3)
    kw = dict(data=str(shards), data_mode="stream", num_classes=4, batch_size=4, max_steps=4, checkpoint_every=2)
    train(make_cfg(dataset, tmp_path / "s", stop_after=2, **kw))
    (shards / "s-2.tar").rename(tmp_path / "s-2.tar")  # a shard fewer
    with pytest.raises(config.ConfigError, match="trained on other data"):
        train(make_cfg(dataset, tmp_path / "s", resume=True, **kw))
    (tmp_path / "s-2.tar").rename(shards / "s-2.tar")
    moved = shards.rename(tmp_path / "moved")
    train(make_cfg(dataset, tmp_path / "s", resume=True, **{**kw, "data": str(moved)}))
    assert (tmp_path / "s" / "final.pt").is_file()

    labels = np.arange(48, dtype=np.int32) % 4
    first = cluster_folder(tmp_path / "a", labels, np.zeros((4, 16), np.float32))
    kw = dict(max_steps=4, checkpoint_every=2, class_sample_rate=1.0)
    train(make_cfg(dataset, tmp_path / "i", pseudo_labels=str(first), stop_after=2, **kw))
    other = cluster_folder(tmp_path / "b", (labels + 1) % 4, np.zeros((4, 16), np.float32))
    with pytest.raises(config.ConfigError, match="trained on other data"):
        train(make_cfg(dataset, tmp_path / "i", pseudo_labels=str(other), resume=True, **kw))
    moved = first.rename(tmp_path / "c")
    train(make_cfg(dataset, tmp_path / "i", pseudo_labels=str(moved), resume=True, **kw))
    assert (tmp_path / "i" / "final.pt").is_file()


def test_evaluate_cli_query_gallery_and_json(dataset, tmp_path, capsys):
    import json

    from unicom.evaluate import main

    out = tmp_path / "m.json"
    images = str(dataset / "imgs")
    main(["--data", images, "--gallery", images, "--method", "pixels", "--pixel-size", "8", "--output", str(out),
          "--num-workers", "0", "--ks", "1", "5"])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["protocol"] == "query-gallery" and result["recall@1"] == 1.0  # each query finds itself
    assert "R@5" in capsys.readouterr().out
