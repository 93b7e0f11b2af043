"""Hostile inputs to the pipeline steps: each must fail early with one clear line, or be skipped and counted."""

import io
import os
import stat
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from test_pipeline_cluster import write_store  # noqa: E402

from unicom import atomic, config, features  # noqa: E402
from unicom.cluster import ClusterConfig  # noqa: E402
from unicom.data import DataError, ImageDataset, folder_source, list_source, open_source, wds_source  # noqa: E402
from unicom.demo import DemoConfig  # noqa: E402
from unicom.features import FeaturesConfig, FeatureStore, extract  # noqa: E402
from unicom.model import eval_transform  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here on one torch thread (the shared ``one_thread`` fixture)."""


def png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_images(root, n=6, bad=()):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:02d}.png").write_bytes(b"garbage" if i in bad else png_bytes(30 * i))
    return root


def pixel_cfg(tmp_path, **kw):
    values = dict(
        data=str(tmp_path / "imgs"),
        output_dir=str(tmp_path / "feats"),
        model="pixels",
        mode="image",
        pixel_size=4,
        batch_size=2,
        shard_size=2,
        num_workers=0,
        device="cpu",
    )
    values.update(kw)
    return config.make(FeaturesConfig, values)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def unit_rows(n, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cluster_cfg(tmp_path, **kw):
    values = dict(features_dir=str(tmp_path / "f"), output_dir=str(tmp_path / "c"), device="cpu")
    values.update(kw)
    return config.make(ClusterConfig, values)


@pytest.fixture()
def no_kmeans(monkeypatch):
    """Fail loudly if k-means starts: the errors under test must come before it."""
    pytest.importorskip("faiss")
    from unicom import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("k-means ran before the input was checked")

    monkeypatch.setattr(cluster, "train_kmeans", refuse)
    return cluster


# -- the demo: reruns with other settings, test_classes, atomic plot ------------------------------------------------


class _Stop(Exception):
    pass


def test_demo_rerun_with_other_split_refuses_then_overwrites(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from unicom import demo

    asked = []

    def stop(feat_cfg, **kwargs):
        asked.append(feat_cfg.overwrite)
        raise _Stop

    monkeypatch.setattr(demo, "extract", stop)
    written = []
    real_write = atomic.write_bytes
    monkeypatch.setattr(atomic, "write_bytes", lambda p, d: written.append(p) or real_write(p, d))
    with pytest.raises(_Stop):
        demo.run(config.make(DemoConfig, dict(output_dir=str(tmp_path))), progress=False)
    assert sum(str(p).endswith(".png") for p in written) == 1797  # the digits go through unicom.atomic
    (tmp_path / "features").mkdir(exist_ok=True)
    (tmp_path / "features" / "meta.json").write_text("{}")
    by_class = dict(output_dir=str(tmp_path), split="class", test_classes=[0, 1])
    with pytest.raises(config.ConfigError, match="--overwrite") as err:
        demo.run(config.make(DemoConfig, by_class), progress=False)
    assert hasattr(DemoConfig(), "overwrite")  # the option the message names exists
    assert "\n" not in str(err.value)
    with pytest.raises(_Stop):
        demo.run(config.make(DemoConfig, {**by_class, "overwrite": True}), progress=False)
    data = tmp_path / "data"
    assert sorted(p.name for p in (data / "test").iterdir()) == ["0", "1"]
    assert len(list(data.rglob("*.png"))) == 1797  # no image of the earlier split is left
    assert not (tmp_path / "features").exists()  # features of the old images are gone too
    assert asked == [False, True]  # a features run of other settings is replaced under the demo's --overwrite


@pytest.mark.parametrize(
    "values",
    [
        {"test_classes": [42]},
        {"test_classes": [-1, 3]},
        {"split": "class", "test_classes": list(range(10))},
        {"split": "class", "test_classes": []},
    ],
)
def test_demo_validates_test_classes(tmp_path, values):
    with pytest.raises(config.ConfigError, match="test_classes"):
        config.make(DemoConfig, {"output_dir": str(tmp_path), **values})


def test_loss_plot_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from unicom.train import METRIC_FIELDS, plot_loss

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    rows = "".join(
        ",".join(str(step if f == "step" else 1.0 / step) for f in METRIC_FIELDS) + "\n" for step in (1, 2, 3)
    )
    (train_dir / "metrics.csv").write_text(",".join(METRIC_FIELDS) + "\n" + rows)
    written = []
    real_write = atomic.write_bytes
    monkeypatch.setattr(atomic, "write_bytes", lambda p, d: written.append(p) or real_write(p, d))
    plot_loss(train_dir, tmp_path / "loss.png")
    assert [os.fspath(p) for p in written] == [os.fspath(tmp_path / "loss.png")]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "train"]


# -- atomic writes ---------------------------------------------------------------------------------------------------


def test_atomic_removes_a_killed_writers_temp_file(tmp_path):
    stale = tmp_path / ".labels.npy.k3j9x.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".ids.txt.a1b2.tmp"  # another file's writer may still be running
    other.write_bytes(b"busy")
    atomic.save_npy(tmp_path / "labels.npy", np.arange(3))
    assert not stale.exists() and other.exists()
    assert np.load(tmp_path / "labels.npy").tolist() == [0, 1, 2]


def test_atomic_files_get_the_usual_mode(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    path = atomic.write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


# -- output folders are checked at validation ----------------------------------------------------------------------


def test_writable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(config.ConfigError, match="'output_dir'.*is a file"):
        config.writable_location("output_dir", blocker / "sub" / "dir")
    with pytest.raises(config.ConfigError, match="'output_dir' must be a folder"):
        config.writable_location("output_dir", blocker)
    config.writable_location("output_dir", tmp_path / "new" / "nested" / "dir")
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize(
    "cls, values",
    [
        (ClusterConfig, {"features_dir": "f"}),
        (FeaturesConfig, {"data": "imgs"}),
        (DemoConfig, {}),
    ],
)
def test_output_dir_under_a_file_fails_at_validation(tmp_path, cls, values):
    (tmp_path / "file").write_text("x")
    with pytest.raises(config.ConfigError, match="'output_dir'"):
        config.make(cls, {**values, "output_dir": str(tmp_path / "file" / "out")})


# -- cluster: non-finite features, too few points, every cluster dropped ----------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_cluster_rejects_nonfinite_features_before_kmeans(tmp_path, no_kmeans, value):
    x = unit_rows(60)
    x[45, 3] = value
    write_store(tmp_path / "f", x, shard=30)  # rows 30..59 are shard_00001.npy
    with pytest.raises(DataError, match=r"shard_00001\.npy.*row 15") as err:
        no_kmeans.run(cluster_cfg(tmp_path, num_clusters=4), quiet=True)
    assert "\n" not in str(err.value)


def test_feature_rows_are_checked_as_they_are_read(tmp_path):
    """Rows outside k-means' sample are checked when the assignment reads them: no extra pass."""
    x = unit_rows(60)
    x[45, 3] = np.inf
    write_store(tmp_path / "f", x, shard=30)
    store = FeatureStore(tmp_path / "f")
    store.rows(0, 45)
    store.take(np.array([3, 44, 46]))
    for read in (lambda: store.rows(40, 50), lambda: store.take(np.array([2, 45]))):
        with pytest.raises(DataError, match=r"shard_00001\.npy: row 15 holds NaN/inf"):
            read()


def test_cluster_train_size_below_num_clusters_fails_at_validation(tmp_path):
    with pytest.raises(config.ConfigError, match="train_size"):
        cluster_cfg(tmp_path, num_clusters=10, train_size=5)
    cluster_cfg(tmp_path, num_clusters=10, train_size=0)  # 0 = every row


def test_cluster_min_cluster_size_above_rows_fails_before_kmeans(tmp_path, no_kmeans):
    write_store(tmp_path / "f", unit_rows(20), shard=30)
    with pytest.raises(config.ConfigError, match="min_cluster_size"):
        no_kmeans.run(cluster_cfg(tmp_path, num_clusters=4, min_cluster_size=21), quiet=True)


def test_cluster_every_cluster_dropped(tmp_path):
    pytest.importorskip("faiss")
    from unicom import cluster

    write_store(tmp_path / "f", unit_rows(40), shard=30)
    with pytest.raises(config.ConfigError, match="min_cluster_size") as err:
        cluster.run(cluster_cfg(tmp_path, num_clusters=8, min_cluster_size=21), quiet=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c" / "labels.npy").exists()


@pytest.mark.parametrize("text", [b"{not json", b'{"dim": 8}', b"\xff\xfe"])
def test_cluster_damaged_feature_index_is_named(tmp_path, no_kmeans, text):
    write_store(tmp_path / "f", unit_rows(20), shard=30)
    (tmp_path / "f" / "index.json").write_bytes(text)
    with pytest.raises(DataError, match=r"index\.json is damaged or unreadable") as err:
        no_kmeans.run(cluster_cfg(tmp_path, num_clusters=4), quiet=True)
    assert "\n" not in str(err.value)


# -- features: a run killed during --overwrite ----------------------------------------------------------------------


def test_features_overwrite_killed_midway_leaves_no_stale_index(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs")
    extract(pixel_cfg(tmp_path), quiet=True)
    out = tmp_path / "feats"
    assert (out / "index.json").is_file()
    real_shard = features._extract_shard
    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(features, "_extract_shard", killed)
    new = pixel_cfg(tmp_path, pixel_size=5, overwrite=True)
    with pytest.raises(_Stop):
        extract(new, quiet=True)
    assert not (out / "index.json").exists() and not (out / "ids.txt").exists()
    with pytest.raises(DataError, match="index not found"):
        FeatureStore(out)
    monkeypatch.setattr(features, "_extract_shard", real_shard)
    index = extract(pixel_cfg(tmp_path, pixel_size=5), quiet=True)  # the new settings resume
    assert index["dim"] == 3 * 25 and FeatureStore(out).rows().shape == (6, 75)


# -- data: worker errors, BOM, truncated shards, bad .cls -------------------------------------------------------------


def test_worker_data_error_is_one_line(tmp_path):
    src = folder_source(make_images(tmp_path / "imgs", bad=(1,)))
    loader = torch.utils.data.DataLoader(ImageDataset(src, eval_transform(8)), batch_size=2, num_workers=1)
    with pytest.raises(DataError, match=r"^sample '01.png': cannot decode image .*01\.png") as err:
        list(loader)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    lenient = torch.utils.data.DataLoader(
        ImageDataset(src, eval_transform(8), skip_bad=True), batch_size=6, num_workers=1
    )
    (batch,) = list(lenient)
    assert batch[3].tolist() == [True, False, True, True, True, True]


def test_features_cli_worker_error_is_one_line(tmp_path, capsys):
    make_images(tmp_path / "imgs", bad=(3,))
    argv = ["--data", str(tmp_path / "imgs"), "--output-dir", str(tmp_path / "feats"), "--model", "pixels"]
    argv += ["--mode", "image", "--num-workers", "1", "--device", "cpu", "--shard-size", "2", "--batch-size", "2"]
    with pytest.raises(SystemExit) as exit_info:
        features.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("unicom-features: error: sample '03.png': cannot decode image")


def test_csv_list_with_utf8_bom(tmp_path):
    make_images(tmp_path / "imgs", n=2)
    (tmp_path / "list.csv").write_bytes("path,label\nimgs/00.png,0\nimgs/01.png,1\n".encode("utf-8-sig"))
    src = list_source(tmp_path / "list.csv")
    assert src.ids == ["imgs/00.png", "imgs/01.png"] and src.labels().tolist() == [0, 1]
    (tmp_path / "list.txt").write_bytes("imgs/01.png 1\n".encode("utf-8-sig"))
    assert list_source(tmp_path / "list.txt").ids == ["imgs/01.png"]


def wds_members(n=3, cls=lambda i: str(i)):
    members = []
    for i in range(n):
        members += [(f"k{i}.png", png_bytes(40 * i)), (f"k{i}.cls", cls(i).encode())]
    return members


def test_truncated_wds_shard(tmp_path):
    shard = write_tar(tmp_path / "shard-000.tar", wds_members())
    with tarfile.open(shard) as tar:
        cut = tar.getmember("k2.png").offset_data + 10  # inside the last image
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"shard-000\.tar.*truncated") as err:
        wds_source(str(shard))
    assert "\n" not in str(err.value)
    src = open_source(str(shard), skip_bad=True)
    assert src.ids == ["k0", "k1", "k2"]
    items = [ImageDataset(src, eval_transform(8), skip_bad=True)[i] for i in range(3)]
    assert [ok for *_, ok in items] == [True, True, False] and items[1][1] == 1
    with pytest.raises(DataError, match=r"shard-000\.tar"):
        src.load_image(2)
    index = extract(pixel_cfg(tmp_path, data=str(shard), skip_bad=True), quiet=True)
    assert index["rows"] == 2 and index["skipped"] == 1


def test_truncated_wds_header(tmp_path):
    shard = write_tar(tmp_path / "shard-000.tar", wds_members())
    with tarfile.open(shard) as tar:
        cut = tar.getmember("k2.png").offset + 100  # inside the last header
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"shard-000\.tar.*truncated"):
        wds_source(str(shard))
    assert wds_source(str(shard), skip_bad=True).ids == ["k0", "k1"]


def test_wds_non_integer_cls(tmp_path):
    shard = write_tar(tmp_path / "shard-000.tar", wds_members(cls=lambda i: "cat" if i == 1 else str(i)))
    with pytest.raises(DataError, match=r"shard-000\.tar.*'k1'.*'cat'") as err:
        wds_source(str(shard))
    assert "\n" not in str(err.value)
    src = wds_source(str(shard), skip_bad=True)
    dataset = ImageDataset(src, eval_transform(8), skip_bad=True)
    assert [dataset[i][3] for i in range(3)] == [True, False, True]
    assert src.labels().tolist() == [0, -1, 2]
