"""Features of webdataset shards, streamed: rows, ids, shard table and positions equal an independent decoding
of the samples; no header scan at start-up, nothing held per sample, resume by tar, ranks take alternate tars."""

import gc
import io
import json
import re
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

import unicom.data  # noqa: E402
from unicom import atomic, config, dist, features, stream  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.features import FeaturesConfig, FeatureStore, extract, shard_paths  # noqa: E402
from unicom.model import pixel_transform  # noqa: E402

# Per tar: samples (image kind, caption?). "png"/"jpg" decode, "bad" does not, None = a key without image
# (not a sample), "cut" = the tar ends inside this image (the last sample of its tar).
LAYOUT = [
    [("png", True)] * 7,
    [("png", True), ("png", False), ("bad", True), (None, True), ("jpg", True), ("png", True)],
    [],
    [("jpg", False)],
    [("png", True), ("png", True), ("png", False), ("cut", True)],
    [("png", True)] * 9,
]


def encoded(rng, fmt, size):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_wds(root, layout=LAYOUT):
    """The tars of ``layout`` in ``root``; returns per tar its samples as (key, image bytes or None when
    undecodable, caption or None), in tar order."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for s, spec in enumerate(layout):
        members, samples, cut = [], [], None
        for i, (kind, captioned) in enumerate(spec):
            key = f"d{s}/{i:03d}" if s == 5 else f"k{s}_{i:03d}"  # keys with a folder part too
            caption = f"caption {s} {i}" if captioned else None
            if kind is not None:
                data = (
                    b"not an image"
                    if kind == "bad"
                    else encoded(rng, "JPEG" if kind == "jpg" else "PNG", (5 + i % 3, 4 + s % 3))
                )
                members.append((f"{key}.{'jpg' if kind == 'jpg' else 'png'}", data))
                samples.append((key, None if kind in ("bad", "cut") else data, caption))
                cut = key if kind == "cut" else cut
            if caption:
                members.append((f"{key}.txt", caption.encode()))
            members.append((f"{key}.cls", str(i % 2).encode()))
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if cut:
            with tarfile.open(path) as tar:
                end = tar.getmember(f"{cut}.png").offset_data + 10
            path.write_bytes(path.read_bytes()[:end])
        written.append(samples)
    return written


def expected(written, pixel_size, dtype, mode="image"):
    """``(rows, ids, names, samples, rows per tar, positions)`` of the pixel features, decoded here."""
    transform = pixel_transform(pixel_size)
    rows, ids, counts, positions = [], [], [], []
    for samples in written:
        kept = 0
        for position, (key, data, caption) in enumerate(samples):
            if data is None or (mode == "joint" and caption is None):
                continue
            image = Image.open(io.BytesIO(data)).convert("RGB")
            rows.append(F.normalize(transform(image).flatten()[None].float(), dim=1).numpy().astype(dtype))
            ids.append(key)
            positions.append(position)
            kept += 1
        counts.append(kept)
    names = [f"shard-{s:03d}.tar" for s in range(len(written))]
    return np.concatenate(rows), ids, names, [len(s) for s in written], counts, positions


@pytest.fixture()
def wds(tmp_path):
    return tmp_path / "shards", write_wds(tmp_path / "shards")


def pixel_cfg(data, out, **kw):
    values = dict(
        data=str(data), output_dir=str(out), model="pixels", mode="image", pixel_size=3, batch_size=3,
        shard_size=4, num_workers=0, device="cpu", skip_bad=True, dtype="float32",
    )  # fmt: skip
    values.update(kw)
    return config.make(FeaturesConfig, values)


def outputs(out):
    """What k-means and training read from a features folder, as bytes (rows as one array)."""
    store = FeatureStore(out)
    names = ("ids.txt", stream.TABLE_FILE, stream.POSITIONS_FILE)
    return store.rows(), {name: (out / name).read_bytes() for name in names}


def check(out, written, pixel_size=3, dtype="float32"):
    rows, ids, names, samples, counts, positions = expected(written, pixel_size, dtype)
    store = FeatureStore(out)
    got = np.concatenate([np.asarray(s) for s in store.shards if len(s)])
    assert got.dtype == rows.dtype and got.tobytes() == rows.tobytes()  # bitwise
    assert store.ids == ids and (out / "ids.txt").read_text() == "".join(i + "\n" for i in ids)
    table = stream.ShardTable.load(out)
    assert table.names == names and table.samples.tolist() == samples and table.rows.tolist() == counts
    assert table.start.tolist() == np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    stored = np.load(out / stream.POSITIONS_FILE)
    assert stored.dtype == np.int32 and stored.tolist() == positions
    index = json.loads((out / "index.json").read_text())
    assert index["rows"] == len(ids) and index["skipped"] == sum(samples) - len(ids) == 2
    assert index["num_samples"] == sum(samples) and len(index["shards"]) == len(written)  # one shard per tar


@pytest.mark.parametrize(("workers", "dtype"), [(0, "float32"), (2, "float16")])
def test_streamed_features_equal_an_independent_decoding(wds, tmp_path, workers, dtype):
    data, written = wds
    extract(pixel_cfg(data, tmp_path / "feats", num_workers=workers, dtype=dtype), quiet=True)
    check(tmp_path / "feats", written, dtype=dtype)
    # The positions join pseudo-labels back to the samples of the stream training reads.
    labels = np.arange(len(FeatureStore(tmp_path / "feats")), dtype=np.int64)
    atomic.save_npy(tmp_path / "labels.npy", labels)
    join = stream.PositionLabels.open(tmp_path / "feats", tmp_path / "labels.npy")
    assert join.unit_labels(1).tolist() == [7, 8, -1, 9, 10]  # sample 1: no caption is fine in image mode


def test_no_header_scan_and_no_sample_index(wds, tmp_path, monkeypatch):
    """Start-up lists the tars and reads none: the first batch is encoded when only the first tar is open;
    the indexing code that keeps a record per sample is never called."""
    data, written = wds

    def forbidden(*args, **kwargs):
        raise AssertionError("a per-sample index was built")

    indexing = [(unicom.data, "wds_source"), (unicom.data, "_index_shard"), (unicom.data, "open_source"),
                (features, "open_source"), (stream.ShardTable, "scan"), (unicom.data.Source, "__init__")]  # fmt: skip
    for owner, name in indexing:
        monkeypatch.setattr(owner, name, forbidden)
    opened, at_first_batch = [], []
    real_iter, real_call = features.iter_tar, features._Encoder.__call__
    monkeypatch.setattr(features, "iter_tar", lambda path, *a, **k: opened.append(path) or real_iter(path, *a, **k))

    def encode(self, images, captions):
        if not at_first_batch:
            at_first_batch.append(list(opened))
        return real_call(self, images, captions)

    monkeypatch.setattr(features._Encoder, "__call__", encode)
    extract(pixel_cfg(data, tmp_path / "feats"), quiet=True)
    assert at_first_batch[0] == [str(data / "shard-000.tar")]
    assert opened == [str(data / f"shard-{s:03d}.tar") for s in range(len(written))]  # each tar read once
    check(tmp_path / "feats", written)
    meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
    assert "num_samples" not in meta and meta["num_tars"] == len(written) and meta["shard_size"] is None


def small_tars(root, tars, per_tar):
    root.mkdir()
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 9).save(buffer, format="PNG")
    for s in range(tars):
        with tarfile.open(root / f"{s:04d}.tar", "w") as tar:
            for i in range(per_tar):
                info = tarfile.TarInfo(f"sample-{s:04d}-{i:06d}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))


def test_memory_grows_with_the_tars_not_the_samples(tmp_path, monkeypatch):
    """Live Python heap each time a tar's shard is written, over 10 tars of 400 samples: it grows by what a
    tar adds, well below 16 bytes per sample (an id list, or a record per sample, would take 60-250). The
    bounded caches of compiled glob patterns (the atomic writes' clean-up) are left out."""
    small_tars(tmp_path / "warm", 1, 10)
    extract(pixel_cfg(tmp_path / "warm", tmp_path / "warm-feats", skip_bad=False), quiet=True)  # one-time imports
    small_tars(tmp_path / "data", 10, 400)
    live, real = [], features._Rows.write

    def write(self, *args, **kwargs):
        real(self, *args, **kwargs)
        gc.collect()
        caches = ("*/re/*", "*/fnmatch.py", "*/pathlib.py", tracemalloc.__file__)
        heap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, c) for c in caches])
        live.append(sum(stat.size for stat in heap.statistics("filename")))

    monkeypatch.setattr(features._Rows, "write", write)
    tracemalloc.start()
    try:
        extract(
            pixel_cfg(tmp_path / "data", tmp_path / "feats", pixel_size=2, batch_size=64, skip_bad=False), quiet=True
        )
    finally:
        tracemalloc.stop()
    assert len(FeatureStore(tmp_path / "feats")) == 4000 and len(live) == 10
    per_sample = np.polyfit(np.arange(2, 10) * 400, live[2:], 1)[0]
    assert per_sample < 16, (per_sample, live)


class _Killed(Exception):
    pass


def test_resume_after_a_killed_run_skips_the_finished_tars(wds, tmp_path, monkeypatch):
    data, written = wds
    extract(pixel_cfg(data, tmp_path / "straight"), quiet=True)
    out = tmp_path / "feats"
    real = features.iter_tar

    def dies_at_tar_4(path, *args, **kwargs):
        if path.endswith("shard-004.tar"):
            raise _Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(features, "iter_tar", dies_at_tar_4)
    with pytest.raises(_Killed):
        extract(pixel_cfg(data, out), quiet=True)
    assert [shard_paths(out, s).features.is_file() for s in range(6)] == [True] * 4 + [False] * 2
    assert not (out / "index.json").exists() and not (out / "ids.txt").exists()
    stamps = [shard_paths(out, s).features.stat().st_mtime_ns for s in range(4)]
    monkeypatch.setattr(features, "iter_tar", real)
    extract(pixel_cfg(data, out, num_workers=2, batch_size=2), quiet=True)  # other loader settings resume too
    assert [shard_paths(out, s).features.stat().st_mtime_ns for s in range(4)] == stamps
    rows, files = outputs(out)
    straight_rows, straight_files = outputs(tmp_path / "straight")
    assert rows.tobytes() == straight_rows.tobytes() and files == straight_files
    check(out, written)


def test_resume_in_process_opens_only_the_unfinished_tars(wds, tmp_path, monkeypatch):
    data, _ = wds
    out = tmp_path / "feats"
    extract(pixel_cfg(data, out), quiet=True)
    before = outputs(out)
    for s in (1, 4):
        shard_paths(out, s).features.unlink()
    opened = []
    real = features.iter_tar
    monkeypatch.setattr(features, "iter_tar", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    extract(pixel_cfg(data, out), quiet=True)
    assert opened == [str(data / "shard-001.tar"), str(data / "shard-004.tar")]
    after = outputs(out)
    assert after[0].tobytes() == before[0].tobytes() and after[1] == before[1]


def test_two_ranks_take_alternate_tars(wds, tmp_path, monkeypatch):
    """As under torchrun: rank 0 checks the folder and writes meta.json before the first barrier, and the index
    after the last one, when every shard is there. Rank 1 runs here inside rank 0's first barrier."""
    data, written = wds
    out = tmp_path / "feats"
    opened, barriers, rank_1 = [], [], {}
    real = features.iter_tar
    monkeypatch.setattr(features, "iter_tar", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))

    def as_rank(rank):
        monkeypatch.setattr(dist, "setup", lambda *a, **k: dist.DistInfo(rank, 2, 0, torch.device("cpu")))

    def barrier():
        barriers.append(len(opened))
        if len(barriers) == 1:  # rank 0 has claimed the folder: rank 1 runs to its end (its barriers pass)
            as_rank(1)
            rank_1["index"] = extract(pixel_cfg(data, out), quiet=True)
            rank_1["opened"] = [int(p[-7:-4]) for p in opened]
            opened.clear()

    monkeypatch.setattr(dist, "barrier", barrier)
    as_rank(0)
    index = extract(pixel_cfg(data, out), quiet=True)
    assert barriers[0] == 0  # rank 0 read no tar before the barrier
    assert rank_1 == {"index": {}, "opened": [1, 3, 5]}
    assert [int(p[-7:-4]) for p in opened] == [0, 2, 4] and index["rows"] == len(FeatureStore(out))
    check(out, written)


def test_a_changed_tar_is_refused_and_an_unchanged_rerun_does_nothing(wds, tmp_path, monkeypatch):
    data, _ = wds
    out = tmp_path / "feats"
    extract(pixel_cfg(data, out), quiet=True)
    opened = []
    real = features.iter_tar
    monkeypatch.setattr(features, "iter_tar", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    extract(pixel_cfg(data, out), quiet=True)
    assert opened == []
    with open(data / "shard-000.tar", "ab") as handle:  # one more (zero) block: the tar changed
        handle.write(b"\0" * 512)
    with pytest.raises(config.ConfigError, match=r"different settings \(\['input'\]\)"):
        extract(pixel_cfg(data, out), quiet=True)
    extract(pixel_cfg(data, out, overwrite=True), quiet=True)
    assert len(opened) == 6


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_without_skip_bad_names_the_sample(wds, tmp_path, workers):
    data, _ = wds
    out = tmp_path / "feats"
    with pytest.raises(DataError, match=r"^sample 'k1_002': cannot decode image .*shard-001\.tar") as err:
        extract(pixel_cfg(data, out, skip_bad=False, num_workers=workers), quiet=True)
    assert "\n" not in str(err.value)
    assert shard_paths(out, 0).features.is_file() and not (out / "index.json").exists()  # finished tars stay


def test_no_images_at_all(tmp_path):
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "empty.tar", "w"):
        pass
    with pytest.raises(DataError, match="no images found"):
        extract(pixel_cfg(tmp_path / "shards", tmp_path / "feats"), quiet=True)


def test_a_key_with_a_line_break_is_refused_before_its_tar_is_encoded(tmp_path, monkeypatch):
    data = tmp_path / "shards"
    write_wds(data, [[("png", True)] * 2, [("png", True)] * 3])
    with tarfile.open(data / "shard-001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(data / "shard-001.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for member, payload in members:
            member.name = member.name.replace("k1_001", "k1\n001")
            tar.addfile(member, io.BytesIO(payload))
    out = tmp_path / "feats"
    encoded, real = [], features._Rows.add
    monkeypatch.setattr(features._Rows, "add", lambda self, *a: encoded.extend(a[3]) or real(self, *a))
    with pytest.raises(
        DataError, match=r"^sample 'k1\\n001' of webdataset shard .*shard-001\.tar: its id holds a line"
    ):
        extract(pixel_cfg(data, out, skip_bad=False), quiet=True)
    assert encoded == ["k0_000", "k0_001"] and not shard_paths(out, 1).features.exists()  # none of tar 1
    index = extract(pixel_cfg(data, out), quiet=True)  # --skip-bad: skipped and counted, the run resumes
    assert index["rows"] == 4 and index["skipped"] == 1
    assert FeatureStore(out).ids == ["k0_000", "k0_001", "k1_000", "k1_002"]
    assert np.load(out / stream.POSITIONS_FILE).tolist() == [0, 1, 0, 2]


def test_a_tar_damaged_in_the_middle_stops_the_run(wds, tmp_path):
    """A damaged member header reads as the end of the archive to tarfile: neither a silent success with the
    later samples lost, nor "0 skipped"."""
    data, _ = wds
    path = data / "shard-005.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmember("d5/004.png").offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 100)
    with pytest.raises(DataError, match=r"shard .*shard-005\.tar is damaged: the member header at byte"):
        extract(pixel_cfg(data, tmp_path / "feats", skip_bad=True), quiet=True)  # the other tars' damage is skipped
    assert (
        shard_paths(tmp_path / "feats", 4).features.exists()
        and not shard_paths(tmp_path / "feats", 5).features.exists()
    )
    assert not (tmp_path / "feats" / "index.json").exists()


def test_damaged_shard_table_and_label_files_name_the_file(wds, tmp_path):
    data, _ = wds
    out = tmp_path / "feats"
    extract(pixel_cfg(data, out), quiet=True)
    atomic.save_npy(tmp_path / "labels.npy", np.zeros(len(FeatureStore(out)), np.int64))
    for path, damage in [
        (out / stream.TABLE_FILE, b"{not json"),
        (out / stream.TABLE_FILE, b'{"names": ["a"], "samples": [1, 2], "start": [0], "rows": [1]}'),
        (out / stream.POSITIONS_FILE, None),
        (tmp_path / "labels.npy", None),
        (tmp_path / "labels.npy", b"garbage"),
    ]:
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2] if damage is None else damage)
        with pytest.raises(unicom.data.DamagedFileError, match=rf"^{re.escape(str(path))} is damaged"):
            stream.PositionLabels.open(out, tmp_path / "labels.npy")
        path.write_bytes(original)
    assert len(stream.PositionLabels.open(out, tmp_path / "labels.npy").labels) == len(FeatureStore(out))


# ---------------------------------------------------------------------------------------------------------------
# captions: the mode of a stream is decided from its first shard

pytest.importorskip("open_clip")

from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402


def clip_cfg(data, out, model_config, **kw):
    return pixel_cfg(data, out, model=TINY_NAME, model_config=str(model_config), **{"skip_bad": False, **kw})


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / f"{TINY_NAME}.json"
    atomic.write_json(path, TINY_CLIP)
    return path


def test_auto_mode_is_joint_when_the_first_shard_has_every_caption(wds, tmp_path, tiny, capsys, one_thread):
    data, written = wds
    out = tmp_path / "feats"
    with pytest.raises(DataError, match=r"sample 'k1_001' of webdataset shard .*shard-001\.tar has no caption"):
        extract(clip_cfg(data, out, tiny, mode="auto"), quiet=True)
    assert shard_paths(out, 0).features.is_file()
    index = extract(clip_cfg(data, out, tiny, mode="auto", skip_bad=True))  # resumes: skip_bad is no setting
    err = capsys.readouterr().err
    assert "mode=joint: the 7 samples of the first shard" in err and "skipped and counted" in err
    assert "5 skipped, 3 of them without a caption" in err
    assert index["mode"] == "joint" and index["rows"] == sum(len(s) for s in written) - 5
    assert FeatureStore(out).ids == [k for s in written for k, d, c in s if d is not None and c is not None]


def test_auto_mode_is_image_when_the_first_shard_lacks_a_caption(tmp_path, tiny, capsys, one_thread):
    written = write_wds(tmp_path / "shards", [[("png", True), ("png", False)], [("png", True)]])
    index = extract(clip_cfg(tmp_path / "shards", tmp_path / "feats", tiny, mode="auto"))
    assert (
        index["mode"] == "image"
        and index["rows"] == 3
        and FeatureStore(tmp_path / "feats").ids == [k for s in written for k, _, _ in s]
    )
    assert "no captions for 1 of the 2 samples of the first shard" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["joint", "text"])
def test_explicit_caption_mode_fails_before_loading(tmp_path, tiny, monkeypatch, mode):
    monkeypatch.setattr(features, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    write_wds(tmp_path / "none", [[], [("png", False)], [("png", True)]])  # judged on the first tar with samples
    with pytest.raises(config.ConfigError, match=f"mode={mode} needs captions, but .* has none in the 1 samples"):
        extract(clip_cfg(tmp_path / "none", tmp_path / "a", tiny, mode=mode), quiet=True)
    write_wds(tmp_path / "some", [[("png", True), ("png", False)]])
    with pytest.raises(config.ConfigError, match=r"1 of the 2 samples of the first shard .*'k0_001'.*--skip-bad"):
        extract(clip_cfg(tmp_path / "some", tmp_path / "b", tiny, mode=mode), quiet=True)
    assert not (tmp_path / "a" / "meta.json").exists() and not (tmp_path / "b" / "meta.json").exists()


def test_text_mode_keeps_undecodable_images_with_a_caption(wds, tmp_path, tiny, one_thread):
    data, written = wds
    index = extract(clip_cfg(data, tmp_path / "feats", tiny, mode="text", skip_bad=True), quiet=True)
    ids = FeatureStore(tmp_path / "feats").ids
    assert "k1_002" in ids and "k1_001" not in ids and "k4_003" not in ids  # the cut sample lost its caption too
    assert index["rows"] == len(ids) == sum(1 for s in written for k, d, c in s if c and k != "k4_003")


def test_auto_mode_leaves_damaged_samples_out_of_the_caption_census(tmp_path, tiny, capsys, one_thread):
    """With --skip-bad a damaged sample is skipped in every mode: it does not make the stream caption-less."""
    data = tmp_path / "shards"
    write_wds(data, [[("png", True)] * 4])
    path = data / "shard-000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            if member.name == "k0_002.cls":
                payload = b"not a number"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    index = extract(clip_cfg(data, tmp_path / "feats", tiny, mode="auto", skip_bad=True))
    assert index["mode"] == "joint" and index["rows"] == 3 and index["skipped"] == 1
    assert "mode=joint: the 3 samples of the first shard" in capsys.readouterr().err
