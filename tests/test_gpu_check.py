"""The GPU check script on a machine without a GPU: it stops at once, fits its slot, judges right."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_goals

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@no_cuda
def test_gpu_check_fails_at_once_without_cuda(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "abc123"],
        env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is visible" in proc.stderr
    assert time.perf_counter() - start < 60  # an import of torch, nothing else
    assert not list(tmp_path.iterdir())  # no step ran


def test_step_timeouts_fit_the_slot():
    text = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.startswith("#"))
    steps = re.findall(r"^timeout (\d+) (.*)$", text, flags=re.M)
    # Every command that can take time is bounded: the probe and version lines too.
    everything = re.findall(r"\btimeout (\d+) ", text)
    assert len(steps) == 4 and len(everything) == 7 and sum(map(int, everything)) <= 540, everything
    # Timings come first, then the GPU tests, without -x: every failure gets listed.
    assert "gpu_goals.py" in steps[0][1]
    assert "pytest" in steps[1][1] and "-x" not in steps[1][1].split()


@no_cuda
def test_goals_script_refuses_without_cuda(capsys):
    assert gpu_goals.main(["--k", "512"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _row(variant, mode="eager", K=512, **fields):
    return dict(K=K, variant=variant, mode=mode, check="ok", **fields)


def test_goal_lines_judge_the_eager_rows_at_shape_a():
    rows = [
        _row("forward", median_us=80.0),
        _row("forward", mode="graph", median_us=60.0),
        _row("forward_backward", median_us=351.0),
        _row("forward_backward", K=256, median_us=100.0),
        _row("memory", transient_mb=30.0),
    ]
    verdicts = gpu_goals.goal_lines(rows)
    assert [ok for ok, _ in verdicts] == [True, False, True]
    assert verdicts[1][1].startswith("FAIL forward_backward at shape A (K=512): 351.0 us (goal <= 350 us)")
    # A variant whose check failed has no time: its goal fails as not measured.
    failed = [dict(_row("forward"), check="FAIL", loss_err=1.0)]
    assert gpu_goals.goal_lines(failed)[0] == (False, "FAIL forward at shape A (K=512): not measured (goal <= 85 us)")


def test_checks_against_float64_catch_a_wrong_result():
    gen = torch.Generator().manual_seed(0)
    ref = (torch.tensor(12.0, dtype=torch.float64), torch.randn(8, 4, generator=gen, dtype=torch.float64))
    close = (ref[0].float() + 1e-3, (ref[1] * (1 + 1e-3)).float())
    assert gpu_goals.passes(gpu_goals.errors(close, ref))
    wrong = (ref[0].float(), torch.zeros(8, 4))
    errs = gpu_goals.errors(wrong, ref)
    assert errs["grad_x_err"] == pytest.approx(1.0) and not gpu_goals.passes(errs)
    assert not gpu_goals.passes(gpu_goals.errors((ref[0].float() * 1.1,), ref[:1]))
