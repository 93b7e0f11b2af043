"""Data sources: image folder, CSV / list files, webdataset shards; bad images; the epoch sampler."""

import io
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from unicom.data import (  # noqa: E402
    DataError,
    EpochBatchSampler,
    ImageDataset,
    decode_image,
    expand_shards,
    folder_source,
    iter_tar,
    list_source,
    open_source,
    resolve_format,
    wds_source,
)
from unicom.model import eval_transform, train_transform  # noqa: E402


def png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, per_class=3, classes=("cat", "dog")):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(40 * c + i))
            (root / name / f"{i}.txt").write_text(f"a {name} number {i}")
    return root


def test_folder_source(tmp_path):
    src = folder_source(make_folder(tmp_path / "imgs"))
    assert len(src) == 6 and src.class_names == ["cat", "dog"]
    assert src.ids[:2] == ["cat/0.png", "cat/1.png"]
    assert src.labels().tolist() == [0, 0, 0, 1, 1, 1]
    assert src.records[4].caption == "a dog number 1"
    assert src.load_image(0).size == (8, 8)
    assert open_source(str(tmp_path / "imgs")).ids == src.ids


def test_list_files(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "list.csv").write_text("path,label,caption\nimgs/cat/0.png,dog,hi\nimgs/dog/2.png,cat,\n")
    src = list_source(tmp_path / "list.csv")
    assert src.ids == ["imgs/cat/0.png", "imgs/dog/2.png"]
    assert src.labels().tolist() == [1, 0] and src.class_names == ["cat", "dog"]
    assert src.records[0].caption == "hi" and src.records[1].caption is None
    assert src.load_image(1).size == (8, 8)
    (tmp_path / "list.txt").write_text("cat/1.png 4\ndog/0.png 2\n")
    src = open_source(str(tmp_path / "list.txt"), root=str(tmp_path / "imgs"))
    assert src.labels().tolist() == [4, 2]
    (tmp_path / "bad.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(DataError, match="'path'"):
        list_source(tmp_path / "bad.csv")


def test_webdataset_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"s{s}_{i:03d}", "png": png_bytes(10 * i), "txt": f"caption {i}", "cls": i})
    src = wds_source(str(tmp_path / "shard-{000..001}.tar"))
    assert len(src) == 6 and src.ids[3] == "s1_000"
    assert src.labels().tolist() == [0, 1, 2, 0, 1, 2]
    assert src.records[2].caption == "caption 2"
    assert np.asarray(src.load_image(4)).shape == (8, 8, 3)
    assert open_source(str(tmp_path)).ids == src.ids  # a folder of .tar files
    with pytest.raises(DataError, match="shard not found"):
        wds_source(str(tmp_path / "shard-{000..002}.tar"))


def test_corrupt_and_missing_images(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "cat" / "1.png").write_bytes(b"not a png")
    (tmp_path / "list.csv").write_text("path,label\nimgs/cat/0.png,0\nimgs/cat/404.png,1\n")
    src = folder_source(root)
    with pytest.raises(DataError, match=r"'cat/1.png'.*cannot decode"):
        src.load_image(1)
    listed = list_source(tmp_path / "list.csv")
    with pytest.raises(DataError, match="not found.*404.png"):
        listed.load_image(1)
    tf = eval_transform(8)
    with pytest.raises(DataError):
        ImageDataset(src, tf)[1]
    dataset = ImageDataset(src, tf, skip_bad=True)
    image, label, index, ok = dataset[1]
    assert not ok and label == -1 and index == 1 and image.shape == (3, 8, 8)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=6))
    assert int((~batches[0][3]).sum()) == 1  # counted
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "nowhere"))


def test_seeded_augmentation_is_reproducible(tmp_path):
    src = folder_source(make_folder(tmp_path / "imgs"))
    ds = ImageDataset(src, train_transform(8, crop_scale=0.3), seed=3)
    a, b = ds[2][0], ds[2][0]
    assert torch.equal(a, b)
    ds.epoch = 1
    assert not torch.equal(a, ds[2][0]) or True  # a different epoch may draw another crop


def test_epoch_sampler_partitions_and_resumes():
    full = [list(EpochBatchSampler(23, 4, seed=1, epoch=0, rank=r, world_size=2)) for r in range(2)]
    assert all(len(b) == 2 and all(len(x) == 4 for x in b) for b in full)  # 23 // 8 = 2 batches per rank
    flat = [i for b in full for x in b for i in x]
    assert len(set(flat)) == 16
    resumed = list(EpochBatchSampler(23, 4, seed=1, epoch=0, rank=1, world_size=2, start=1))
    assert resumed == full[1][1:]
    assert list(EpochBatchSampler(23, 4, seed=1, epoch=1)) != list(EpochBatchSampler(23, 4, seed=1, epoch=0))
    with pytest.raises(DataError, match="batch_size"):
        EpochBatchSampler(3, 4, seed=0, epoch=0)


def write_tar(path, names):
    """A tar of one PNG per name; returns the byte offset of each member's header."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, name in enumerate(names):
            data = png_bytes(10 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            offsets.append(tar.offset)
            tar.addfile(info, io.BytesIO(data))
    return offsets


@pytest.mark.parametrize("damage", [b"\xff" * 200, b"\0" * 512])
def test_a_damaged_member_header_is_an_error_naming_the_shard(tmp_path, damage):
    """tarfile takes an unreadable header past the first as the end of the archive: the samples after it
    must not vanish silently, with skip_bad either (they can be neither read nor counted)."""
    path = tmp_path / "s-000.tar"
    offsets = write_tar(path, [f"{i}.png" for i in range(5)])
    assert [t.key for t in iter_tar(str(path))] == ["0", "1", "2", "3", "4"]  # the end blocks are no damage
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(offsets[2])
        handle.write(damage)
    assert path.stat().st_size == size
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=rf"shard {re.escape(str(path))} is damaged.*byte {offsets[2]}"):
            list(iter_tar(str(path), skip_bad=skip_bad))
        with pytest.raises(DataError, match="s-000.tar is damaged"):
            wds_source(str(path), skip_bad=skip_bad)


def test_existing_paths_are_taken_literally(tmp_path):
    """Names holding glob, brace or list characters are legal file names: an existing path is not a pattern."""
    make_folder(tmp_path / "imgs")
    for name in ("train[v2].csv", "train{v2}.csv", "a,b*?.csv"):
        (tmp_path / name).write_text("path,label\nimgs/cat/0.png,0\nimgs/dog/1.png,1\n")
        assert resolve_format(str(tmp_path / name)) == "list"
        assert open_source(str(tmp_path / name)).ids == ["imgs/cat/0.png", "imgs/dog/1.png"]
    shards = tmp_path / "shards[1]"
    shards.mkdir()
    write_tar(shards / "part,1.tar", ["a.png"])
    write_tar(shards / "p{2}.tar", ["b.png"])
    write_tar(shards / "q[3].tar", ["c.png"])
    assert resolve_format(str(shards)) == "wds"  # a folder whose name holds [ ] still lists its tars
    assert open_source(str(shards)).ids == ["a", "b", "c"]
    for name in ("part,1.tar", "p{2}.tar", "q[3].tar"):
        assert expand_shards(str(shards / name)) == [str(shards / name)]
    listed = [str(shards / "p{2}.tar"), str(shards / "q[3].tar")]
    assert expand_shards(",".join(listed)) == listed  # each existing part of a list is literal too
    assert len(expand_shards(str(tmp_path / "sh*" / "*.tar"))) == 3  # a path that does not exist is a pattern


def test_16_bit_grayscale_is_scaled_to_8_bits():
    """Not clipped to 0/255 by the RGB conversion: every Pillow mode 16-bit files open as gives the image
    that the same picture at 8 bits gives."""
    values = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    expected = np.repeat(np.rint(values / 257).astype(np.uint8)[..., None], 3, axis=2)
    encoded = {}
    for fmt, array in [("PNG", values), ("TIFF", values.astype(">u2"))]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        encoded[fmt] = buffer.getvalue()
    encoded["PGM"] = b"P5\n16 16\n65535\n" + values.astype(">u2").tobytes()
    for fmt, data in encoded.items():
        mode = Image.open(io.BytesIO(data)).mode
        assert mode in ("I;16", "I;16B", "I"), (fmt, mode)
        image = decode_image(data, "s", fmt)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected), (fmt, mode)
    buffer = io.BytesIO()
    Image.fromarray(expected[..., 0]).save(buffer, format="PNG")  # 8-bit grayscale: as it was
    assert np.array_equal(np.asarray(decode_image(buffer.getvalue(), "s", "8-bit")), expected)
