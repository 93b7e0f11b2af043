"""Streamed webdataset shards: split across ranks and workers, labels by position, exact resume, O(shards) state."""

import dataclasses
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from unicom import atomic, config, stream  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.model import pixel_transform  # noqa: E402
from unicom.stream import PositionLabels, ShardStream, ShardTable  # noqa: E402


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), value % 256).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root, sizes, cls=lambda s, i: i % 3):
    """Shards ``root/shard-SSS.tar`` of ``sizes[s]`` samples ``<s><i>.png`` + ``.cls``; returns their paths."""
    paths = []
    for s, n in enumerate(sizes):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                for ext, data in (("png", png(7 * s + i)), ("cls", str(cls(s, i)).encode())):
                    info = tarfile.TarInfo(f"{s:03d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def make_stream(shards, **kw):
    values = dict(transform=pixel_transform(2), batch_size=4, seed=3, buffer=6)
    values.update(kw)
    return ShardStream(shards, **values)


def batches(dataset, start=0, workers=0):
    """``[(keys, labels, images)]`` of one epoch of ``dataset`` from batch ``start`` on."""
    dataset.start_batch = start
    loader = torch.utils.data.DataLoader(dataset, batch_size=dataset.batch_size, num_workers=workers)
    return [(keys.tolist(), labels.tolist(), images) for images, labels, keys, _ in loader]


def test_shards_are_split_across_ranks_and_workers(tmp_path):
    shards = write_shards(tmp_path, [9, 10, 11, 9, 10, 12, 9, 8])
    seen = []
    for rank in range(2):
        dataset = make_stream(shards, rank=rank, world_size=2, num_workers=2)
        got = batches(dataset, workers=2)
        assert len(got) == dataset.batches_per_epoch() > 0 and all(len(k) == 4 for k, _, _ in got)
        keys = [k for ks, _, _ in got for k in ks]
        assert len(set(keys)) == len(keys)
        seen.append(set(keys))
    assert not seen[0] & seen[1]  # no sample is read by both ranks


@pytest.mark.parametrize("slots", [1, 3, 4, 16])
def test_the_deal_balances_samples_not_shards(slots):
    rng = np.random.default_rng(slots)
    kept = rng.integers(0, 50, 16)
    kept[[2, 9]] = [0, 400]  # a shard without labelled samples, and one larger than a slot's share
    pieces = stream.deal(kept, slots, seed=3)
    totals = [sum(p.hi - p.lo for p in slot) for slot in pieces]
    assert max(totals) - min(totals) <= 1 and sum(totals) == kept.sum()
    covered = sorted((p.shard, i) for slot in pieces for p in slot for i in range(p.lo, p.hi))
    assert covered == [(s, i) for s in range(16) for i in range(kept[s])]  # each labelled sample once
    assert sum(len(slot) for slot in pieces) <= np.count_nonzero(kept) + slots - 1  # a cut splits one shard
    assert pieces == stream.deal(kept, slots, seed=3)  # every rank deals alike


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_an_epoch_sees_nearly_every_sample_when_shard_sizes_differ(tmp_path):
    """16 shards, one short, at 4 ranks x 4 workers: dealt by shard count each slot would hold one shard
    and be cut to the short one's 5 samples (64 of 605 seen); dealt by samples, at most a batch per slot
    is left out. Every sample comes at most once, and resume stays exact."""
    shards = write_shards(tmp_path, [40] * 15 + [5])
    ranks = [make_stream(shards, rank=r, world_size=4, num_workers=4) for r in range(4)]
    keys = [k for dataset in ranks for ks, _, _ in batches(dataset, workers=4) for k in ks]
    assert len(set(keys)) == len(keys) >= 0.9 * 605
    assert ranks[0].batches_per_epoch() * 4 * 4 == len(keys) >= 605 - 16 * 4
    dataset = ranks[1]
    dataset.epoch = 2
    straight = [k for k, _, _ in batches(dataset, workers=4)]
    for start in (1, 6, len(straight) - 1):
        assert [k for k, _, _ in batches(dataset, start, 4)] == straight[start:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_uninterrupted_sequence(tmp_path, workers):
    shards = write_shards(tmp_path, [9, 10, 11, 13])
    dataset = make_stream(shards, num_workers=workers)
    dataset.epoch = 1
    straight = batches(dataset, workers=workers)
    for start in (1, 3, len(straight) - 1):
        resumed = batches(dataset, start, workers)
        assert [k for k, _, _ in resumed] == [k for k, _, _ in straight[start:]]
        assert [lab for _, lab, _ in resumed] == [lab for _, lab, _ in straight[start:]]
        for (_, _, a), (_, _, b) in zip(resumed, straight[start:], strict=True):
            assert torch.equal(a, b)  # augmentation is seeded by (seed, epoch, sample)


def test_resume_does_not_open_the_shards_already_read(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, [12, 12, 12, 12])
    dataset = make_stream(shards, buffer=3)
    opened = []
    real = stream.iter_tar
    monkeypatch.setattr(stream, "iter_tar", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    batches(dataset)
    order = [shards[piece.shard] for piece in dataset._order(0)[0]]
    assert opened == order
    opened.clear()
    dataset.start_batch = 7  # 28 of the 48 samples taken: the buffer of 3 holds samples of the third shard
    cursor, _ = dataset.cursors()[0]
    assert cursor == 2
    batches(dataset, 7)
    assert opened == order[cursor:]


def test_pseudo_labels_join_by_position(tmp_path):
    shards = write_shards(tmp_path, [6, 5])
    # Features skipped sample 2 of shard 0; k-means left row 4 unlabelled.
    table = ShardTable(
        ["shard-000.tar", "shard-001.tar"], np.array([6, 5]), np.array([0, 5]), np.array([5, 5])
    )  # fmt: skip
    positions = np.array([0, 1, 3, 4, 5, 0, 1, 2, 3, 4], np.int32)
    labels = np.array([10, 11, 13, -1, 15, 20, 21, 22, 23, 24])
    join = PositionLabels(table, labels, positions)
    np.testing.assert_array_equal(join.unit_labels(0), [10, 11, -1, 13, -1, 15])
    dataset = make_stream(shards[::-1], labels=join, batch_size=1, buffer=2)  # matched by name, not order
    got = {(k >> 32, k & 0xFFFFFFFF): lab[0] for ks, lab, _ in batches(dataset) for k in ks}
    expected = {(1, p): 10 + p for p in (0, 1, 3, 5)} | {(0, p): 20 + p for p in range(5)}
    assert got == expected
    with pytest.raises(DataError, match="shard-009.tar.*not in the shard table"):
        make_stream([*shards, str(tmp_path / "shard-009.tar")], labels=join)
    with pytest.raises(DataError, match="9 pseudo-labels for the 10 feature rows"):
        PositionLabels(table, labels[:9], positions)


def test_state_grows_with_shards_not_samples(tmp_path):
    """What a rank keeps for the run (and pickles to each worker) is per shard: counts, no sample objects;
    memory-mapped labels travel as their file name."""
    sizes = {}
    for per_shard in (10, 400):
        root = tmp_path / str(per_shard)
        root.mkdir()
        shards = write_shards(root, [per_shard] * 4)
        counts = np.full(4, per_shard)
        ShardTable([f"shard-00{s}.tar" for s in range(4)], counts, np.arange(4) * per_shard, counts).save(root)
        atomic.save_npy(root / "labels.npy", np.zeros(4 * per_shard, np.int64))
        dataset = make_stream(shards, labels=PositionLabels.open(root, root / "labels.npy"))
        sizes[per_shard] = len(pickle.dumps(dataset))
        copy = pickle.loads(pickle.dumps(dataset))
        assert isinstance(copy.labels.labels, np.memmap) and len(copy.labels.labels) == 4 * per_shard
    assert sizes[400] - sizes[10] < 64


def test_a_shard_shorter_than_its_table_is_an_error(tmp_path):
    shards = write_shards(tmp_path, [6, 6])
    table = ShardTable([f"shard-00{s}.tar" for s in range(2)], np.array([8, 6]), np.array([0, 8]), np.array([8, 6]))
    dataset = make_stream(shards, labels=PositionLabels(table, np.zeros(14, np.int64), None), batch_size=2)
    with pytest.raises(DataError, match="shard-000.tar ends at sample 6, before the 8"):
        batches(dataset)


def test_a_shard_longer_than_its_table_is_an_error(tmp_path):
    shards = write_shards(tmp_path, [9, 6])  # shard 0 grew after its features were made
    table = ShardTable([f"shard-00{s}.tar" for s in range(2)], np.array([6, 6]), np.array([0, 6]), np.array([6, 6]))
    dataset = make_stream(shards, labels=PositionLabels(table, np.arange(12) % 3, None), batch_size=2, buffer=3)
    with pytest.raises(DataError, match="shard-000.tar holds 9 samples but the shard table lists 6"):
        batches(dataset)


def test_too_few_shards_for_the_workers(tmp_path):
    with pytest.raises(DataError, match="2 webdataset shard.*2 rank.*2 data-loader worker"):
        make_stream(write_shards(tmp_path, [4, 4]), world_size=2, num_workers=2)


# ---------------------------------------------------------------------------------------------------------------
# through unicom-features and unicom-train


pytest.importorskip("open_clip")

from unicom.demo import TINY_CLIP, TINY_NAME  # noqa: E402
from unicom.features import FeaturesConfig, extract  # noqa: E402
from unicom.train import STREAM_MIN_SHARDS, TrainConfig, read_metrics, train  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """16 shards of 4 bar images, their pixel features (one sample corrupt, skipped), hand-made clusters."""
    root = tmp_path_factory.mktemp("stream")
    data = root / "shards"
    data.mkdir()
    shards = write_shards(data, [4] * STREAM_MIN_SHARDS)
    broken = tarfile.open(shards[3]).getmember("0030001.png")
    with open(shards[3], "r+b") as handle:  # the image of shard 3, sample 1 no longer decodes
        handle.seek(broken.offset_data)
        handle.write(b"\0" * broken.size)
    features = extract(
        config.make(
            FeaturesConfig,
            dict(
                data=str(data),
                output_dir=str(root / "feats"),
                model="pixels",
                mode="image",
                pixel_size=4,
                num_workers=0,
                device="cpu",
                skip_bad=True,
                shard_size=20,
            ),
        ),  # fmt: skip
        quiet=True,
    )
    rows = features["rows"]
    clusters = root / "clusters"
    atomic.save_npy(clusters / "labels.npy", np.arange(rows, dtype=np.int64) % 3)
    atomic.save_npy(clusters / "centroids.npy", np.zeros((5, 48), np.float32))  # 5 kept clusters, 3 used
    atomic.write_json(root / f"{TINY_NAME}.json", TINY_CLIP)
    return root, rows


def train_cfg(root, out, **kw):
    values = dict(
        data=str(root / "shards"), pseudo_labels=str(root / "clusters"), features_dir=str(root / "feats"),
        output_dir=str(out), arch=f"open_clip:{TINY_NAME}", model_config=str(root / f"{TINY_NAME}.json"),
        embedding_dim=16, batch_size=4, max_steps=6, warmup_steps=1, class_sample_rate=1.0, num_workers=0,
        log_every=1, checkpoint_every=100, progress=False, device="cpu", image_size=8, shuffle_buffer=5,
    )  # fmt: skip
    values.update(kw)
    return config.make(TrainConfig, values)


def test_features_write_the_shard_table(pipeline):
    root, rows = pipeline
    table = ShardTable.load(root / "feats")
    assert rows == 63 and table.samples.tolist() == [4] * 16 and table.rows[3] == 3 and table.rows.sum() == 63
    assert table.start.tolist() == [0, 4, 8, 12, *range(15, 63, 4)]
    positions = np.load(root / "feats" / stream.POSITIONS_FILE)
    assert positions[12:15].tolist() == [0, 2, 3]


def test_stream_training_resumes_exactly(pipeline, tmp_path, one_thread):
    root, _ = pipeline
    result = train(train_cfg(root, tmp_path / "a"))
    assert result["num_classes"] == 5  # the clusters k-means kept, not the largest label + 1
    interrupted = train_cfg(root, tmp_path / "b", checkpoint_every=2, stop_after=4)
    train(interrupted)
    with pytest.raises(config.ConfigError, match="streams through 1 data-loader worker.*num_workers=0"):
        train(dataclasses.replace(interrupted, stop_after=None, resume=True, num_workers=2))
    train(dataclasses.replace(interrupted, stop_after=None, resume=True))
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    np.testing.assert_array_equal(read_metrics(tmp_path / "a")["loss"], read_metrics(tmp_path / "b")["loss"])


def test_indexed_training_joins_by_position_too(pipeline, tmp_path, one_thread):
    root, _ = pipeline
    result = train(train_cfg(root, tmp_path / "i", data_mode="indexed", skip_bad=True, max_steps=2))
    assert result["num_classes"] == 5
    with pytest.raises(config.ConfigError, match="63 labels for the 64 samples.*set features_dir"):
        train(train_cfg(root, tmp_path / "j", data_mode="indexed", features_dir=None))
    with pytest.raises(config.ConfigError, match="stream.*set features_dir"):
        train(train_cfg(root, tmp_path / "k", features_dir=None))
