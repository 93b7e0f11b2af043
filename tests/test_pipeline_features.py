"""Features with a tiny random-init open_clip model: shapes, normalisation, fp16, resume by shard."""

import json

import numpy as np
import pytest
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")

from unicom import atomic, config  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.features import FeaturesConfig, FeatureStore, extract, shard_paths  # noqa: E402
from unicom.stream import POSITIONS_FILE, ShardTable  # noqa: E402


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        path = tmp_path / "imgs" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(f"picture number {i}")
    model_config = tmp_path / f"{TINY_NAME}.json"
    atomic.write_json(model_config, TINY_CLIP)
    return tmp_path, str(model_config)


def make_cfg(tmp_path, model_config, **kw):
    values = dict(
        data=str(tmp_path / "imgs"),
        output_dir=str(tmp_path / "feats"),
        model=TINY_NAME,
        model_config=model_config,
        batch_size=4,
        shard_size=4,
        num_workers=0,
        device="cpu",
    )
    values.update(kw)
    return config.make(FeaturesConfig, values)


@pytest.mark.parametrize("mode", ["joint", "image", "text"])
def test_shapes_and_normalisation(setup, mode):
    tmp_path, model_config = setup
    index = extract(make_cfg(tmp_path, model_config, mode=mode, dtype="float32"), quiet=True)
    store = FeatureStore(tmp_path / "feats")
    assert index["rows"] == len(store) == 10 and store.dim == TINY_CLIP["embed_dim"]
    assert [s["rows"] for s in index["shards"]] == [4, 4, 2]
    x = store.rows()
    assert x.dtype == np.float32 and x.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert store.ids == [f"{i:02d}.png" for i in range(10)]
    assert json.loads((tmp_path / "feats" / "meta.json").read_text())["random_init"] is True


def test_fp16_storage_and_resume_skips_finished_shards(setup):
    tmp_path, model_config = setup
    cfg = make_cfg(tmp_path, model_config, mode="image", dtype="float16")
    extract(cfg, quiet=True)
    out = tmp_path / "feats"
    assert np.load(shard_paths(out, 0)[0]).dtype == np.float16
    before = FeatureStore(out).rows()
    stamps = {s: shard_paths(out, s)[0].stat().st_mtime_ns for s in (0, 2)}
    shard_paths(out, 1)[0].unlink()  # as if interrupted while shard 1 was being written
    extract(cfg, quiet=True)
    assert {s: shard_paths(out, s)[0].stat().st_mtime_ns for s in (0, 2)} == stamps
    np.testing.assert_allclose(FeatureStore(out).rows(), before, atol=1e-3)
    with pytest.raises(config.ConfigError, match="different settings"):
        extract(make_cfg(tmp_path, model_config, mode="joint"), quiet=True)


def test_pixels_and_bad_images(setup):
    tmp_path, model_config = setup
    (tmp_path / "imgs" / "03.png").write_bytes(b"garbage")
    cfg = make_cfg(tmp_path, model_config, model="pixels", mode="image", pixel_size=6)
    with pytest.raises(DataError, match="03.png"):
        extract(cfg, quiet=True)
    index = extract(config.make(FeaturesConfig, {**vars(cfg), "skip_bad": True, "overwrite": True}), quiet=True)
    assert index["rows"] == 9 and index["skipped"] == 1 and index["dim"] == 3 * 36
    assert "03.png" not in FeatureStore(tmp_path / "feats").ids
    # A folder is one unit over several output shards: positions are the samples' places in the folder.
    table = ShardTable.load(tmp_path / "feats")
    assert table.names == [f"image folder {tmp_path / 'imgs'}"] and table.samples.tolist() == [10]
    assert table.start.tolist() == [0] and table.rows.tolist() == [9]
    assert np.load(tmp_path / "feats" / POSITIONS_FILE).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert np.load(shard_paths(tmp_path / "feats", 0).positions).tolist() == [0, 1, 2]
