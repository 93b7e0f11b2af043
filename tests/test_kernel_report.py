"""``benchmarks/kernel_report.py``'s shape-A model runs without a GPU and reports every launch sensibly.

The report compiles for sm_90 and so needs non-interpreted kernels: it runs in a subprocess
with ``TRITON_INTERPRET=0`` (this test session has it set to 1), model only, at ``K = 256`` and 512.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_GEMMS = {"lse_partial", "softmax_grad", "grad_gemm"}


def _compiled_python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root with the kernels compiled, not interpreted."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("kernel_report") / "rows.jsonl"
    proc = _compiled_python("benchmarks/kernel_report.py", "--model-only", "--k", "256", "512", "--json", str(out))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_kernel_rows(report):
    _, rows = report
    kernels = [r for r in rows if r["kind"] == "model_kernel"]
    row_wise = {"unit_rows", "unit_rows_grad", "lse_combine", "loss_finalize"}
    assert {r["kernel"].split("[")[0] for r in kernels} == _GEMMS | row_wise
    for r in kernels:
        assert r["K"] in (256, 512) and r["phase"] in ("forward", "backward"), r
        assert r["registers"] > 0 and r["blocks_per_sm"] >= 1 and r["programs"] > 0 and r["launches"] >= 1, r
        assert 0 < r["wave_efficiency"] <= 1, r
        assert isinstance(r["pipelined"], bool), r
        assert r["model_us"] > 0, r
        if r["kernel"].split("[")[0] in _GEMMS:
            assert r["wgmma"] and r["flops"] > 0 and r["hbm_bytes_ideal"] > 0, r


def test_gemm_passes(report):
    """Forward 1 GEMM pass, backward 3 (recompute, grad_x, grad_w): 2 N n K FLOPs each."""
    _, rows = report
    kernels = [r for r in rows if r["kind"] == "model_kernel" and r["K"] == 256]
    one_pass = 2 * 4096 * 12_500 * 256
    for phase, passes in (("forward", 1), ("backward", 3)):
        assert sum(r["flops"] for r in kernels if r["phase"] == phase) == passes * one_pass


def test_gemm_kernels_fill_the_machine(report):
    """At shape A every GEMM launch runs two full waves or at 90 % wave efficiency, and the forward
    and softmax-gradient kernels fit two blocks per SM (their epilogues overlap another block's MMA)."""
    _, rows = report
    for r in rows:
        if r["kind"] != "model_kernel" or r["kernel"].split("[")[0] not in _GEMMS:
            continue
        assert r["waves"] >= 2 or r["wave_efficiency"] >= 0.9, r
        if r["kernel"].split("[")[0] in ("lse_partial", "softmax_grad"):
            assert r["blocks_per_sm"] >= 2, r


def test_totals_beside_goals(report):
    stdout, rows = report
    (totals,) = [r for r in rows if r["kind"] == "model_totals" and r["K"] == 256]
    assert totals["goal_forward_us"] == 85 and totals["goal_step_us"] == 350
    assert 0 < totals["forward_model_us"] < totals["step_model_us"]
    # Forward: normalisation + LSE partials + combine + mean, no torch glue. Backward at shape A:
    # 3 chunks of (softmax gradient, gradient GEMMs) + the normalisation's backward; the only
    # torch launch is autograd's seed gradient of the loss.
    assert totals["forward_triton_launches"] == 4 and totals["forward_torch_launches"] == 0
    assert totals["backward_triton_launches"] == 7 and totals["backward_torch_launches"] == 1
    assert totals["step_gemm_floor_us"] < totals["step_model_us_at_goal_eff"]
    # The launchers' allocations beyond the inputs and the returned loss and gradients: the
    # workspace and the unit rows kept for the backward, under the goal.
    for t in (r for r in rows if r["kind"] == "model_totals"):
        assert 30 < t["transient_mb"] <= t["goal_transient_mb"] == 64, t
    assert "modelled, not measured" in stdout and "MODEL" in stdout
    assert "goal 85 us" in stdout and "goal 350 us" in stdout


def test_design_floor(report):
    """The floor of any recomputing design lies under what the launchers do, over the GEMM passes
    alone, and (as the docs say) above the 350 us goal at K = 512 only."""
    stdout, rows = report
    for t in (r for r in rows if r["kind"] == "model_totals"):
        assert t["softmax_mb"] == pytest.approx(2 * 4096 * 12_500 / 1e6) and t["bound_recomputes"], t
        assert t["bound_forward_launches"] <= t["forward_triton_launches"] + t["forward_torch_launches"]
        assert t["bound_backward_launches"] <= t["backward_triton_launches"] + t["backward_torch_launches"]
        assert t["step_gemm_floor_us"] < t["bound_step_us"] <= t["step_model_us_at_goal_eff"], t
        assert t["bound_forward_us"] <= t["forward_model_us_at_goal_eff"], t
        assert t["bound_step_keeping_us"] < t["bound_step_us"], t
        assert (t["bound_step_us"] > t["goal_step_us"]) == (t["K"] == 512), t
    assert "floor of a design without atomics" in stdout


def test_design_floor_when_the_softmax_fits():
    """A softmax under the memory goal is kept: three GEMM passes, one chunk (two backward launches + seed)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._kernel_model import EFF_GOAL, LAUNCH_S, PEAK_TENSOR_FLOPS, design_bounds

    b = design_bounds(1024, 4000, 256)  # 8.2 MB of softmax in 16 bits
    assert not b["bound_recomputes"] and b["bound_kept_share"] == 1.0
    assert (b["bound_forward_launches"], b["bound_backward_launches"]) == (2, 3)
    one_pass_us = 2 * 1024 * 4000 * 256 / (PEAK_TENSOR_FLOPS * EFF_GOAL) * 1e6
    assert b["bound_step_us"] == pytest.approx(3 * one_pass_us + 5 * LAUNCH_S * 1e6)
    big = design_bounds(65_536, 12_500, 512)  # 1.6 GB of softmax: 26 chunks of at most 64 MB
    assert big["bound_backward_launches"] == 2 * 26 + 1 and big["bound_recomputes"]


_SPECS_MATCH = """
import sys
sys.path.insert(0, "benchmarks")
from _kernel_model import record_step
from unicom_kernels.triton import aot
rec = record_step(64, 300, 32, scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through")
launched = {(l.fn.__name__, l.num_warps, l.num_stages) for l in rec.launches}
compiled = {(s.fn.__name__, s.num_warps, s.num_stages) for s in aot.specs()}
missing = sorted(launched - compiled, key=str)
print(missing)
sys.exit(1 if missing else 0)
"""


def test_aot_specs_compile_kernels_as_the_launchers_launch_them():
    """The compile report must describe the kernels that run: same warps and stages as the launches."""
    proc = _compiled_python("-c", _SPECS_MATCH)
    assert proc.returncode == 0, f"launched but never compiled with these options: {proc.stdout}{proc.stderr[-2000:]}"
