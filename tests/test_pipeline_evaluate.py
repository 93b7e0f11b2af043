"""unicom-evaluate: class names align query and gallery, features join without ambiguity, inputs and
options are refused before anything is embedded."""

import io
import json
import shutil
import tarfile

import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from unicom import config, evaluate  # noqa: E402
from unicom.data import DataError  # noqa: E402
from unicom.evaluate import EvaluateConfig, main  # noqa: E402
from unicom.features import FeaturesConfig, extract  # noqa: E402

try:
    from tests.test_pipeline_data import make_folder, png_bytes
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from test_pipeline_data import make_folder, png_bytes  # type: ignore[no-redef]


def run(**kw):
    values = dict(method="pixels", pixel_size=4, num_workers=0, device="cpu", use_gpu=False)
    values.update(kw)
    return evaluate.evaluate(config.make(EvaluateConfig, values), progress=False)


def fail(capsys, argv):
    """Run the CLI, expecting exit status 2; returns its one-line error."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unicom-evaluate: error: ")
    return err[0]


# -- gallery labels follow the query's class names ------------------------------------------------------------------


def write_list(path, rows):
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_gallery_classes_are_matched_by_name(tmp_path, kind):
    # Query classes a, b, c; the gallery holds the same images of a and c only. Each source numbers its
    # classes itself (gallery c is its class 1, query b's number): matched by name, every scored query
    # finds its own image first, and the queries of b have no relevant item.
    query = make_folder(tmp_path / "query", classes=("a", "b", "c"))
    gallery = tmp_path / "gallery"
    shutil.copytree(query, gallery)
    shutil.rmtree(gallery / "b")
    if kind == "list":
        rows = [(f"{c}/{i}.png", c) for c in "abc" for i in range(3)]
        query = write_list(tmp_path / "query.csv", [(f"query/{p}", c) for p, c in rows])
        gallery = write_list(tmp_path / "gallery.csv", [(f"gallery/{p}", c) for p, c in rows if c != "b"])
    result = run(data=str(query), gallery=str(gallery), ks=[1], knn_k=1)
    assert result["queries"] == 6 and result["queries_without_relevant"] == 3
    assert result["recall@1"] == result["map@r"] == 1.0
    assert result["knn@1"] == 6 / 9  # the b queries cannot vote b


def test_gallery_class_missing_from_the_query_matches_no_query(tmp_path):
    # The gallery holds the query's images plus a class "a" the query lacks (it comes first in the
    # gallery's numbering, so the numbers of b and c differ between the sets).
    query = make_folder(tmp_path / "query", classes=("b", "c"))
    gallery = tmp_path / "gallery"
    shutil.copytree(query, gallery)
    (gallery / "a").mkdir()
    for i in range(3):
        (gallery / "a" / f"{i}.png").write_bytes(png_bytes(200 + i))
    result = run(data=str(query), gallery=str(gallery), ks=[1])
    assert result["queries"] == 6 and result["queries_without_relevant"] == 0
    assert result["recall@1"] == result["map@r"] == 1.0


# -- one set names its classes, the other numbers them ------------------------------------------------------------

NUMBERS = tuple(range(12))  # as folder names they sort 0, 1, 10, 11, 2, ...: positions differ from numbers


def numbered_folder(root, numbers=NUMBERS, spell=str):
    """Class folders ``spell(n)`` of two images each; the images of a class are each other's nearest."""
    for n in numbers:
        (root / spell(n)).mkdir(parents=True)
        for i in range(2):
            (root / spell(n) / f"{i}.png").write_bytes(png_bytes(20 * n + i))
    return root


def write_numbered(tmp_path, folder, kind, numbers=NUMBERS, spell=str):
    """The images of ``numbered_folder`` as a list file or tar shard labelled with the plain numbers."""
    if kind == "list":
        rows = [(f"{spell(n)}/{i}.png", n) for n in numbers for i in range(2)]
        return write_list(folder / "numbered.csv", rows)  # in the folder: ids = the folder's ids
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "part-0.tar", "w") as tar:
        for n in numbers:
            for i in range(2):
                image = (folder / spell(n) / f"{i}.png").read_bytes()
                for ext, data in (("png", image), ("cls", str(n).encode())):
                    info = tarfile.TarInfo(f"k{n}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(shards)


@pytest.mark.parametrize("kind", ["list", "wds"])
@pytest.mark.parametrize("named_side", ["query", "gallery"])
def test_class_names_match_numbered_labels_by_value(tmp_path, kind, named_side):
    # Folder "10" is label 10, not position 2 of the sorted names: every query finds its class first.
    folder = numbered_folder(tmp_path / "imgs")
    numbered = write_numbered(tmp_path, folder, kind)
    query, gallery = (str(folder), numbered) if named_side == "query" else (numbered, str(folder))
    result = run(data=query, gallery=gallery, ks=[1], knn_k=1)
    assert result["queries"] == 24 and result["queries_without_relevant"] == 0
    assert result["recall@1"] == result["map@r"] == result["knn@1"] == 1.0


def test_class_names_match_numbered_labels_with_features(tmp_path):
    folder = numbered_folder(tmp_path / "imgs")
    feat = tmp_path / "feat"
    values = dict(data=str(folder), output_dir=str(feat), model="pixels", dtype="float32", pixel_size=4, num_workers=0)
    extract(config.make(FeaturesConfig, values), quiet=True)
    gallery = write_numbered(tmp_path, folder, "list")
    result = run(data=str(folder), gallery=gallery, method="features", features_dir=str(feat), ks=[1])
    assert result["queries"] == 24 and result["recall@1"] == result["map@r"] == 1.0


def test_zero_padded_class_names_are_read_as_their_number(tmp_path):
    # "007" is 7; gallery label 5 has no query class and query class "010" no gallery image.
    folder = numbered_folder(tmp_path / "imgs", numbers=(7, 10), spell="{:03d}".format)
    gallery = write_list(
        tmp_path / "numbered.csv", [(f"imgs/007/{i}.png", 7) for i in range(2)] + [("imgs/010/0.png", 5)]
    )
    result = run(data=str(folder), gallery=gallery, ks=[1])
    assert result["queries"] == 2 and result["queries_without_relevant"] == 2
    assert result["recall@1"] == result["map@r"] == 1.0


@pytest.mark.parametrize("named_side", ["query", "gallery"])
def test_class_names_that_are_not_numbers_are_refused(tmp_path, capsys, no_embedding, named_side):
    folder = make_folder(tmp_path / "imgs", classes=("7", "cat"))
    numbered = write_list(tmp_path / "numbered.csv", [("imgs/7/0.png", 7), ("imgs/cat/0.png", 8)])
    query, gallery = (str(folder), numbered) if named_side == "query" else (numbered, str(folder))
    line = fail(capsys, ["--data", query, "--gallery", gallery, "--method", "pixels", "--num-workers", "0"])
    assert str(folder) in line and numbered in line and "'cat'" in line and "not a number" in line


def test_class_names_of_one_number_are_refused(tmp_path, capsys, no_embedding):
    folder = make_folder(tmp_path / "imgs", classes=("07", "7"))
    numbered = write_list(tmp_path / "numbered.csv", [("imgs/7/0.png", 7)])
    line = fail(capsys, ["--data", str(folder), "--gallery", numbered, "--method", "pixels", "--num-workers", "0"])
    assert str(folder) in line and numbered in line and "'07' and '7'" in line


def test_named_classes_still_match_by_name_not_number(tmp_path):
    # Both sets name their classes: "07" and "7" are different names, and the numeric names are
    # matched by name although the gallery's lack of "0" shifts its positions.
    query = numbered_folder(tmp_path / "query", numbers=(0, 7, 10, 11))
    gallery = numbered_folder(tmp_path / "gallery", numbers=(7, 10, 11), spell=lambda n: f"{n:02d}")
    result = run(data=str(query), gallery=str(gallery), ks=[1])
    assert result["queries"] == 4 and result["queries_without_relevant"] == 4
    assert result["recall@1"] == result["map@r"] == 1.0


# -- method=features: joined by position, never by an ambiguous id --------------------------------------------------


def write_tars(folder, names):
    """Tars reusing the keys k0..k5; the same key has another class in each tar."""
    folder.mkdir(parents=True)
    for s, name in enumerate(names):
        with tarfile.open(folder / name, "w") as tar:
            for i in range(6):
                c = (i + s) % 3
                for ext, data in (("png", png_bytes(80 * c + 2 * i + s)), ("cls", str(c).encode())):
                    info = tarfile.TarInfo(f"k{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


@pytest.fixture()
def duplicate_keys(tmp_path):
    shards = write_tars(tmp_path / "shards", ["part-0.tar", "part-1.tar"])
    feat = tmp_path / "feat"
    extract(
        config.make(
            FeaturesConfig,
            dict(data=shards, output_dir=str(feat), model="pixels", dtype="float32", pixel_size=4, num_workers=0),
        ),
        quiet=True,
    )
    return shards, str(feat)


def test_features_of_shards_reusing_keys_join_by_position(duplicate_keys):
    shards, feat = duplicate_keys
    pixels = run(data=shards)
    features = run(data=shards, method="features", features_dir=feat)
    assert pixels["recall@1"] == pixels["map@r"] == 1.0
    assert {k: v for k, v in features.items() if k != "method"} == {k: v for k, v in pixels.items() if k != "method"}


def test_duplicate_ids_that_cannot_join_by_position_are_refused(duplicate_keys, tmp_path, capsys):
    _, feat = duplicate_keys
    # The same samples in tars of other names: the shard table does not list them, ids are ambiguous.
    other = write_tars(tmp_path / "renamed", ["x-0.tar", "x-1.tar"])
    line = fail(capsys, ["--data", other, "--method", "features", "--features-dir", feat, "--num-workers", "0"])
    assert feat in line and "'k0'" in line and "more than once" in line


def test_features_join_by_id_when_the_table_does_not_list_the_data(tmp_path):
    images = make_folder(tmp_path / "imgs", classes=("a", "b"))
    feat = tmp_path / "feat"
    values = dict(data=str(images), output_dir=str(feat), model="pixels", dtype="float32", pixel_size=4, num_workers=0)
    extract(config.make(FeaturesConfig, values), quiet=True)
    listed = write_list(images / "list.csv", [(f"{c}/{i}.png", c) for c in "ab" for i in range(3)])  # ids = paths
    by_id = run(data=listed, method="features", features_dir=str(feat))
    assert by_id["queries"] == 6 and by_id["skipped"] == 0 and by_id["recall@1"] == 1.0


# -- inputs are checked before anything is embedded -----------------------------------------------------------------


@pytest.fixture()
def no_embedding(monkeypatch):
    def embed(*args, **kwargs):
        raise AssertionError("embedded before the inputs were checked")

    monkeypatch.setattr(evaluate, "embed", embed)


def test_missing_gallery_is_reported_before_embedding(tmp_path, capsys, no_embedding):
    images = make_folder(tmp_path / "imgs")
    line = fail(capsys, ["--data", str(images), "--gallery", str(tmp_path / "nothing"), "--method", "pixels"])
    assert str(tmp_path / "nothing") in line


def test_unlabelled_query_is_reported_before_embedding(tmp_path, capsys, no_embedding):
    images = make_folder(tmp_path / "imgs")
    shutil.copy(images / "cat" / "0.png", images / "loose.png")
    line = fail(capsys, ["--data", str(images), "--method", "pixels"])
    assert "unlabelled" in line and str(images) in line


# -- options are checked at start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, extra",
    [
        ("batch_size", ["--method", "pixels", "--batch-size", "0"]),
        ("num_workers", ["--method", "pixels", "--num-workers", "-1"]),
        ("pixel_size", ["--method", "pixels", "--pixel-size", "0"]),
        ("embedding_dim", ["--method", "untrained", "--arch", "open_clip:ViT-B-32", "--embedding-dim", "0"]),
        ("knn_k", ["--method", "pixels", "--knn-k", "-5"]),
        ("gallery_format", ["--method", "pixels", "--gallery", ".", "--gallery-format", "bogus"]),
    ],
)
def test_bad_options_are_refused_before_the_data_is_read(tmp_path, capsys, option, extra):
    # The data path does not exist: an option error must come first, naming the option.
    line = fail(capsys, ["--data", str(tmp_path / "missing"), "--device", "cpu", *extra])
    assert f"'{option}'" in line


def test_evaluate_checks_a_config_built_in_code(tmp_path):
    cfg = EvaluateConfig(data=str(tmp_path / "missing"), method="pixels", batch_size=0)
    with pytest.raises(config.ConfigError, match="'batch_size'"):
        evaluate.evaluate(cfg, progress=False)
    with pytest.raises(DataError):  # the options are fine: now the data path is checked
        evaluate.evaluate(EvaluateConfig(data=str(tmp_path / "missing"), method="pixels"), progress=False)


def test_output_json(tmp_path):
    images = make_folder(tmp_path / "imgs")
    out = tmp_path / "m.json"
    run(data=str(images), output=str(out))
    assert json.loads(out.read_text())["protocol"] == "leave-one-out"
