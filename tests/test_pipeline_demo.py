"""The end-to-end demo in a reduced setting: data -> features -> k-means -> training -> evaluation."""

import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

pytest.importorskip("sklearn")
pytest.importorskip("faiss")
pytest.importorskip("open_clip")
pytest.importorskip("matplotlib")

from unicom import config  # noqa: E402
from unicom.demo import DemoConfig, run  # noqa: E402


def test_demo_reduced(tmp_path):
    cfg = config.make(DemoConfig, dict(output_dir=str(tmp_path), steps=20, num_clusters=12, batch_size=64))
    result = run(cfg, progress=False)
    assert [r["model"] for r in result["rows"]] == ["raw pixels (16x16)", "untrained tiny ViT", "trained tiny ViT"]
    for row in result["rows"]:
        assert 0.0 <= row["recall@1"] <= 1.0 and 0.0 <= row["map@r"] <= 1.0
    assert result["rows"][0]["recall@1"] > 0.9  # raw pixels are a strong baseline on digits
    for name in ("results.md", "results.csv", "loss.png", "train/final.pt", "clusters/labels.npy"):
        assert (tmp_path / name).is_file(), name
    assert (
        len(list((tmp_path / "data" / "train").glob("*.png"))) + len(list((tmp_path / "data" / "test").rglob("*.png")))
        == 1797
    )
    # The training images carry no label: they sit flat in data/train.
    assert not [p for p in (tmp_path / "data" / "train").iterdir() if p.is_dir()]


def test_demo_split_by_class(tmp_path):
    cfg = config.make(DemoConfig, dict(output_dir=str(tmp_path), split="class", steps=4, num_clusters=6, batch_size=64))
    run(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "data" / "test").iterdir() if p.is_dir()) == ["5", "6", "7", "8", "9"]
