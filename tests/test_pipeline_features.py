"""Features with a tiny random-init open_clip model: shapes, normalisation, fp16, resume by shard."""

import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("open_clip")

from unicom import atomic, config, features  # noqa: E402
from unicom.data import DamagedFileError, DataError  # noqa: E402
from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.features import FeaturesConfig, FeatureStore, extract, shard_paths  # noqa: E402
from unicom.model import load_clip  # noqa: E402
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


def pixel_cfg(tmp_path, **kw):
    values = dict(model="pixels", mode="image", pixel_size=4, dtype="float32")
    values.update(kw)
    return make_cfg(tmp_path, None, **values)


def test_a_rerun_reading_other_images_is_refused(setup):
    """Which images a folder or list file gives depends on data_root and on the list itself: both are
    settings, so a rerun never mixes or reuses shards of other images."""
    tmp_path, _ = setup
    other = tmp_path / "other"
    other.mkdir()
    for i in range(10):
        Image.new("RGB", (12, 12), (25 * i, 0, 0)).save(other / f"{i:02d}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i:02d}.png\n" for i in range(10)))
    out = tmp_path / "feats"
    as_list = dict(data=str(tmp_path / "list.txt"))
    extract(pixel_cfg(tmp_path, **as_list, data_root=str(tmp_path / "imgs")), quiet=True)
    first = FeatureStore(out).rows()
    shard_paths(out, 1).features.unlink()  # as if interrupted
    (out / "index.json").unlink()
    with pytest.raises(config.ConfigError, match=r"different settings \(\['data_root', 'input'\]\)"):
        extract(pixel_cfg(tmp_path, **as_list, data_root=str(other)), quiet=True)
    extract(pixel_cfg(tmp_path, **as_list, data_root=str(tmp_path / "imgs"), data_format="list"), quiet=True)
    np.testing.assert_array_equal(FeatureStore(out).rows(), first)  # the same images, however the format is named
    (tmp_path / "list.txt").write_text("".join(f"{9 - i:02d}.png\n" for i in range(10)))  # an edited list
    with pytest.raises(config.ConfigError, match=r"different settings \(\['input'\]\)"):
        extract(pixel_cfg(tmp_path, **as_list, data_root=str(tmp_path / "imgs")), quiet=True)
    extract(pixel_cfg(tmp_path, **as_list, data_root=str(other), overwrite=True), quiet=True)
    fresh = tmp_path / "fresh"
    extract(pixel_cfg(tmp_path, **as_list, data_root=str(other), output_dir=str(fresh)), quiet=True)
    np.testing.assert_array_equal(FeatureStore(out).rows(), FeatureStore(fresh).rows())


def test_ids_end_at_newlines_only(tmp_path):
    """str.splitlines() would also split at these characters (and the text mode of open() at '\\r')."""
    names = [f"a{c}b.png" for c in ("\u2028", "\u2029", "\x0c", "\x1c", "\x1e", "\x85", "\r", "\x0b")] + ["z.png"]
    for i, name in enumerate(names):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "imgs" / name, format="PNG")
    index = extract(pixel_cfg(tmp_path), quiet=True)
    store = FeatureStore(tmp_path / "feats")
    assert index["rows"] == len(store) == len(names) and store.ids == sorted(names)


@pytest.mark.parametrize("mode", ["image", "text"])
def test_an_id_with_a_line_break_is_refused_before_encoding(setup, monkeypatch, mode):
    tmp_path, model_config = setup
    (tmp_path / "imgs" / "03.png").rename(tmp_path / "imgs" / "0\n3.png")
    (tmp_path / "imgs" / "03.txt").rename(tmp_path / "imgs" / "0\n3.txt")
    kw = dict(mode=mode, dtype="float32") if mode == "text" else dict(model="pixels", pixel_size=4, mode=mode)
    encode = features._Encoder.__call__
    monkeypatch.setattr(features._Encoder, "__call__", lambda *a: pytest.fail("encoded before the check"))
    with pytest.raises(DataError, match=r"^sample '0\\n3.png' of image folder .*imgs: its id holds a line break"):
        extract(make_cfg(tmp_path, model_config, **kw), quiet=True)
    assert not list((tmp_path / "feats").glob("shard_*"))
    monkeypatch.setattr(features._Encoder, "__call__", encode)
    index = extract(make_cfg(tmp_path, model_config, skip_bad=True, **kw), quiet=True)
    assert index["rows"] == 9 and index["skipped"] == 1 and index["num_samples"] == 10
    assert FeatureStore(tmp_path / "feats").ids == [f"{i:02d}.png" for i in range(10) if i != 3]
    assert np.load(tmp_path / "feats" / POSITIONS_FILE).tolist() == list(range(1, 10))  # "0\n3.png" sorts first
    unit = json.loads(shard_paths(tmp_path / "feats", 0).unit.read_text())
    assert unit["no_caption"] == 0  # skipped for its id: it has a caption


def test_damaged_files_are_one_error_naming_the_file(setup, capsys):
    tmp_path, _ = setup
    out = tmp_path / "feats"
    cfg = pixel_cfg(tmp_path)
    extract(cfg, quiet=True)
    argv = ["--data", cfg.data, "--output-dir", str(out), "--model", "pixels", "--mode", "image"]
    argv += ["--pixel-size", "4", "--dtype", "float32", "--shard-size", "4", "--num-workers", "0", "--device", "cpu"]

    def damage(path, data=None):
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2] if data is None else data)
        return original

    for name, data in [("shard_00001.npy", None), ("index.json", b"{not json"), ("index.json", b"[]")]:
        original = damage(out / name, data)
        with pytest.raises(DamagedFileError, match=rf"^{re.escape(str(out / name))} is damaged"):
            FeatureStore(out)
        (out / name).write_bytes(original)
    original = damage(out / "meta.json", b"{not json")  # a rerun cannot tell which settings made the shards
    with pytest.raises(SystemExit) as exit_info:
        features.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith(f"unicom-features: error: {out / 'meta.json'} is damaged") and "--overwrite" in err
    (out / "meta.json").write_bytes(original)
    for name in ("shard_00001.pos.npy", "shard_00001.unit.json", "shard_00001.npy"):
        damage(out / name, b"garbage" if name.endswith(".json") else None)
        with pytest.raises(DamagedFileError, match=rf"^{re.escape(str(out / name))} is damaged.*delete .*00001\.npy"):
            extract(cfg, quiet=True)
        shard_paths(out, 1).features.unlink()  # what the message says to do: the shard is recomputed
        assert extract(cfg, quiet=True)["rows"] == 10
    (out / "meta.json").write_text("{not json")
    assert extract(config.make(FeaturesConfig, {**vars(cfg), "overwrite": True}), quiet=True)["rows"] == 10


def interrupted(out):
    """Leave ``out`` as a run killed after its first shard leaves it: shard 0 finished, no index."""
    for s in (1, 2):
        shard_paths(out, s).features.unlink()
    (out / "index.json").unlink()


def test_a_replaced_model_config_is_refused(setup):
    """model_config is a setting by the architecture it holds, not by its path."""
    tmp_path, model_config = setup
    out = tmp_path / "feats"
    extract(make_cfg(tmp_path, model_config, mode="image"), quiet=True)
    interrupted(out)
    atomic.write_text(model_config, json.dumps(TINY_CLIP, indent=4))  # the same architecture, reformatted
    extract(make_cfg(tmp_path, model_config, mode="image"), quiet=True)
    other = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": TINY_CLIP["vision_cfg"]["layers"] + 1}}
    atomic.write_json(model_config, other)  # another architecture at the same path
    interrupted(out)
    with pytest.raises(config.ConfigError, match=r"different settings \(\['model_config_digest'\]\).*--overwrite"):
        extract(make_cfg(tmp_path, model_config, mode="image"), quiet=True)


def test_a_replaced_local_weights_file_is_refused(setup):
    """A local pretrained file is known by its size and modification time (as the tars are)."""
    tmp_path, model_config = setup
    out, weights = tmp_path / "feats", tmp_path / "weights.pt"
    torch.save(load_clip(TINY_NAME, None, model_config)[0].state_dict(), weights)
    cfg = make_cfg(tmp_path, model_config, mode="image", pretrained=str(weights))
    extract(cfg, quiet=True)
    interrupted(out)
    extract(cfg, quiet=True)  # the same file: resumed
    interrupted(out)
    stamp = weights.stat().st_mtime_ns
    torch.manual_seed(1)
    torch.save(load_clip(TINY_NAME, None, model_config)[0].state_dict(), weights)  # a later checkpoint, same path
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))  # saved a second later (the clock may not have ticked)
    with pytest.raises(config.ConfigError, match=r"different settings \(\['pretrained_file'\]\)"):
        extract(cfg, quiet=True)
    extract(replace(cfg, overwrite=True), quiet=True)
    recorded = json.loads((out / "meta.json").read_text())["pretrained_file"]
    assert recorded == {"size": weights.stat().st_size, "mtime_ns": stamp + 10**9}


def test_a_resume_in_another_precision_is_refused(setup, monkeypatch):
    """The encoder computes in bf16 autocast on CUDA and in fp32 on the CPU: a run begun on one does not
    resume on the other. The CUDA path's precision is made to apply on the CPU here."""
    tmp_path, model_config = setup
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = make_cfg(tmp_path, model_config, mode="image", dtype="float32")
    assert features.encode_precision(cfg, cuda) == "bf16" and features.encode_precision(cfg, cpu) == "fp32"
    assert features.encode_precision(pixel_cfg(tmp_path), cuda) == "fp32"  # no network, no autocast
    out = tmp_path / "feats"
    fp32 = extract(cfg, quiet=True)
    rows = FeatureStore(out).rows()
    assert fp32["precision"] == "fp32"
    interrupted(out)
    monkeypatch.setattr(features, "encode_precision", lambda *args: "bf16")
    with pytest.raises(config.ConfigError, match=r"different settings \(\['precision'\]\).*--overwrite"):
        extract(cfg, quiet=True)
    assert extract(replace(cfg, overwrite=True), quiet=True)["precision"] == "bf16"
    assert not np.array_equal(FeatureStore(out).rows(), rows)  # the encoder did run in bf16


def test_a_folder_of_earlier_settings_is_refused_naming_the_new_keys(setup):
    tmp_path, _ = setup
    out = tmp_path / "feats"
    extract(pixel_cfg(tmp_path), quiet=True)
    interrupted(out)
    meta = json.loads((out / "meta.json").read_text())
    for key in ("model_config_digest", "pretrained_file", "precision"):
        del meta[key]
    atomic.write_json(out / "meta.json", meta)
    keys = r"\['model_config_digest', 'precision', 'pretrained_file'\]"
    with pytest.raises(config.ConfigError, match=rf"different settings \({keys}\); .*--overwrite"):
        extract(pixel_cfg(tmp_path), quiet=True)
    assert extract(pixel_cfg(tmp_path, overwrite=True), quiet=True)["rows"] == 10


def test_finished_shards_without_meta_json_are_refused(setup):
    """Nothing says which settings made them: neither resumed nor mixed with rows of other settings."""
    tmp_path, _ = setup
    out = tmp_path / "feats"
    extract(pixel_cfg(tmp_path), quiet=True)
    interrupted(out)
    (out / "meta.json").unlink()
    with pytest.raises(config.ConfigError, match=rf"^{re.escape(str(out))} holds feature shards but no meta.json"):
        extract(pixel_cfg(tmp_path, pixel_size=5), quiet=True)
    assert shard_paths(out, 0).features.is_file()  # left alone
    index = extract(pixel_cfg(tmp_path, pixel_size=5, overwrite=True), quiet=True)
    assert index["dim"] == 3 * 25 and FeatureStore(out).rows().shape == (10, 75)


class _Killed(Exception):
    pass


def test_a_folder_of_unfinished_shards_is_taken_over(setup, monkeypatch):
    """A run killed after a shard's positions but before its features holds no finished shard."""
    tmp_path, _ = setup
    out = tmp_path / "feats"
    real = atomic.save_npy

    def killed(path, array):
        if path.name == "shard_00000.npy":
            raise _Killed
        real(path, array)

    monkeypatch.setattr(atomic, "save_npy", killed)
    with pytest.raises(_Killed):
        extract(pixel_cfg(tmp_path), quiet=True)
    monkeypatch.setattr(atomic, "save_npy", real)
    assert shard_paths(out, 0).positions.is_file() and not shard_paths(out, 0).features.exists()
    index = extract(pixel_cfg(tmp_path, pixel_size=5), quiet=True)  # other settings
    assert index["dim"] == 3 * 25 and index["rows"] == 10
