"""Run a scenario on W gloo ranks in fresh processes and collect each rank's result dict.

A scenario is a module-level function ``scenario(rank, world, group) -> dict`` of a test
module (spawned processes import it by name). Results come back through files; a rank
that raised reports its traceback under ``"crash"``, and ranks still running after the
deadline are killed and fail the test (a deadlock).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[[int, int, dist.ProcessGroup], dict]


def spawn(world: int, scenario: Scenario, folder, timeout_s: float = 90.0, collective_timeout_s: float = 60.0) -> list:
    """Run ``scenario`` on ``world`` ranks; return their result dicts, in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    args = (world, scenario, str(folder), collective_timeout_s)
    procs = [ctx.Process(target=_worker, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    name = scenario.__name__
    assert not alive, f"{name}: {len(alive)} rank(s) still running after {timeout_s}s (deadlock?)"
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"{name}: rank {r} crashed:\n{res.get('crash')}"
    return results


def _worker(rank: int, world: int, scenario: Scenario, folder: str, collective_timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    try:
        result = scenario(rank, world, dist.group.WORLD)
    except Exception:  # reported to the parent, which fails the test with it
        result = {"crash": traceback.format_exc()}
    torch.save(result, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
