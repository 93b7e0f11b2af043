"""Smoke test of ``python -m benchmarks.bench_pipeline`` at tiny sizes: every mode and size measured, files written."""

import json

import pytest

for _module in ("yaml", "tqdm"):  # the pipeline extra
    pytest.importorskip(_module)

from benchmarks import bench_pipeline  # noqa: E402


def test_tiny_run_writes_json_and_markdown(tmp_path):
    argv = ["--sizes", "150", "300", "--shards", "4", "--measure-samples", "40", "--no-kmeans",
            "--out-dir", str(tmp_path), "--name", "smoke", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    assert bench_pipeline.main(argv) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows = result["loading"]
    assert [(r["mode"], r["samples"]) for r in rows] == [
        ("indexed", 150), ("stream", 150), ("features", 150), ("indexed", 300), ("stream", 300), ("features", 300)
    ]  # fmt: skip
    assert all(r["startup_s"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert set(result["bytes_per_sample"]) == {"indexed", "stream", "features"}
    text = (tmp_path / "smoke.md").read_text()
    assert "| stream | 300 | 4 |" in text and "| features | 300 | 4 |" in text and "bytes/sample" in text
