"""The torchrun launch line of docs/user-guide.md works (2 CPU processes, gloo)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_example_trains():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "train_distributed.py"),
        "--steps",
        "30",
        "--classes",
        "200",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if _aborted_at_exit(done):
        # torch 2.14's gloo sometimes aborts a rank while the interpreter shuts down, after the
        # script has finished (also with every object holding the group deleted and a barrier
        # before destroy_process_group): once in 6 to 25 runs here. One rerun; twice fails.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 1/2: classes [100, 200)" in done.stdout
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0], done.stdout


def _aborted_at_exit(done: subprocess.CompletedProcess) -> bool:
    """The run finished (its last step printed) and a rank then aborted in gloo's shutdown."""
    finished = any(line.startswith("step   29") for line in done.stdout.splitlines())
    return done.returncode != 0 and finished and "terminate called without an active exception" in done.stderr
