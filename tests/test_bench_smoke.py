"""Smoke test of the benchmark harness: every CPU contestant on one tiny shape, and the files it writes.

Optional peers (pytorch-metric-learning, cut-cross-entropy, matplotlib, tqdm) are used when
installed; a missing one must show up as ``unavailable`` with its reason, never vanish.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from benchmarks import _report, bench_loss
from benchmarks._contestants import CONTESTANTS
from benchmarks._report import COLUMNS

# Peers that may legitimately be absent, by contestant.
_OPTIONAL = {"pml": "pytorch_metric_learning", "cce-compile": "cut_cross_entropy"}
_GPU_ONLY = {"triton", "cce"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--preset", "quick", "--N", "48", "--n", "300", "--D", "24", "--dim-ratio", "0.5",
        "--reps", "2", "--warmup", "1", "--isolate", "none", "--compile-backend", "eager", "--no-progress",
        "--out-dir", str(out), "--name", "smoke",
    ]  # fmt: skip
    # In this process and with torch.compile(backend="eager") for our compiled contestant, to keep the test quick;
    # test_isolated_worker covers the fresh-process path.
    assert bench_loss.main(argv) == 0
    return out, argv


def test_csv_has_every_contestant_and_column(run):
    out, _ = run
    with open(out / "smoke.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = {r["contestant"]: r for r in reader}
    assert set(rows) == set(CONTESTANTS)
    for name, row in rows.items():
        if name in _GPU_ONLY:
            assert row["status"] == "unavailable" and row["reason"], row
        elif name in _OPTIONAL and importlib.util.find_spec(_OPTIONAL[name]) is None:
            assert row["status"] == "unavailable" and "not installed" in row["reason"], row
        else:
            assert row["status"] == "ok", row
            assert row["k"] == "12" and row["N"] == "48" and row["n"] == "300"
            timed = ("fwd_ms", "fwd_ms_min", "fwd_ms_max", "fwd_bwd_ms", "fwd_bwd_cpu_ms")
            for col in (*timed, "mem_fwd_bwd_mib", "fwd_bwd_tflops"):
                assert float(row[col]) >= 0.0, (name, col, row[col])
            assert float(row["fwd_ms_min"]) <= float(row["fwd_ms"]) <= float(row["fwd_ms_max"])
            assert row["check"], row
            if CONTESTANTS[name].kind != "floor":
                assert row["agrees"] == "True", row
                assert float(row["fwd_bwd_vs_ref"]) > 0.0


def test_json_metadata_and_agreement(run):
    out, argv = run
    data = json.loads((out / "smoke.json").read_text())
    meta = data["meta"]
    for key in ("date_utc", "device_name", "cpu_model", "torch", "triton", "git_commit", "command", "peers"):
        assert meta.get(key), key
    assert meta["device"] == "cpu" and meta["isolated"] is False
    assert " ".join(argv) in meta["command"]
    ran = [r for r in data["rows"] if r["status"] == "ok" and r["kind"] != "floor"]
    assert any(r["contestant"] == "torch" for r in ran)
    for row in ran:
        assert row["agrees"] is True
        if row["contestant"] != "reference":
            assert row["loss_err"] < 1e-4 and row["grad_x_err"] < 2e-3 and row["grad_w_err"] < 2e-3, row


def test_markdown_lists_unavailable_with_reason(run):
    out, _ = run
    text = (out / "smoke.md").read_text()
    assert "| contestant |" in text and "**torch**" in text
    assert "`triton`" in text and "GPU only" in text


def test_isolated_worker():
    """One case in a fresh process, as the CPU presets run them: the result row and a real peak RSS."""
    case = {"contestant": "torch", "device": "cpu", "dtype": "fp32", "N": 64, "n": 20000, "D": 32, "k": 32}
    case.update(scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through", seed=0)
    row = bench_loss.run_isolated({**case, "reps": 1, "warmup": 1, "measure_memory": True}, timeout=120)
    assert row["status"] == "ok" and row["agrees"] is True, row
    # At least the [n, D] prototype gradient (2.4 MiB) is new memory; the [N, n] logits (4.9 MiB) are not.
    assert 2.0 < row["mem_fwd_bwd_mib"] < 200, row


def test_plot_and_ratios_from_rows(tmp_path):
    """Derived columns and the PNG on synthetic rows (two n_sampled values), without running anything."""
    pytest.importorskip("matplotlib")
    shape = {"device": "cpu", "dtype": "fp32", "N": 8, "D": 4, "k": 4, "scale": 64.0, "margin": 0.5}
    shape.update(margin_type="arcface", margin_grad="straight_through")
    rows = []
    for n in (100, 1000):
        for name, ms, mib in (("reference", 10.0, 40.0), ("torch", 5.0, 4.0), ("pml", 12.0, 50.0)):
            kind = CONTESTANTS[name].kind
            rows.append({**shape, "n": n, "contestant": name, "kind": kind, "status": "ok", "reason": "",
                         "fwd_ms": ms / 2, "fwd_bwd_ms": ms * n / 100, "mem_fwd_bwd_mib": mib * n / 100})  # fmt: skip
    rows.append({**shape, "n": 100, "contestant": "triton", "kind": "ours", "status": "unavailable", "reason": "GPU"})
    _report.add_derived(rows)
    torch_row = next(r for r in rows if r["contestant"] == "torch" and r["n"] == 1000)
    assert torch_row["fwd_bwd_vs_ref"] == pytest.approx(0.5) and torch_row["mem_vs_ref"] == pytest.approx(0.1)
    meta = _report.metadata("cpu", ["--preset", "quick"], "quick")
    paths = _report.write_all(rows, meta, tmp_path, "synthetic")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "synthetic.png" in paths["md"].read_text() and "`triton`" in paths["md"].read_text()


def test_presets_cover_the_design_shapes():
    shape_a = {"N": 4096, "n": 12500, "D": 512, "dim_ratio": 1.0}
    assert bench_loss.PRESETS["gpu"]["base"] == shape_a
    args = bench_loss.parse_args(["--preset", "gpu"])
    shapes = bench_loss.shapes_of(args, bench_loss.PRESETS["gpu"])
    assert shapes[0] == shape_a and len(shapes) == len({tuple(s.values()) for s in shapes})
    for axis in ("n", "D", "dim_ratio", "N"):
        assert len({s[axis] for s in shapes}) > 2, axis
    cpu = bench_loss.shapes_of(bench_loss.parse_args([]), bench_loss.PRESETS["cpu"])
    assert {"N": 1024, "n": 50000, "D": 512, "dim_ratio": 1.0} in cpu
