"""Measuring one case (contestant x settings): agreement check, timings, peak memory.

:func:`run_case` is what a worker runs. On the CPU each case runs in a fresh process
(``python -m benchmarks.bench_loss --worker CASE_JSON``), because the CPU allocator keeps
no peak counter: the memory a loss adds is read from the kernel's resident-set high-water
mark (``VmHWM``), which is reset through ``/proc/self/clear_refs`` just before the measured
call, minus the resident set at that moment (inputs created, warm-up done, gradients
cleared). Before that measurement glibc is told to return freed memory at once
(``mallopt``), so the resident set follows the live allocations. On CUDA the caching
allocator's peak (``max_memory_allocated``) minus what was allocated before is used.

Timings: ``time.perf_counter`` around each call on the CPU; CUDA events around each call
on the GPU, with the L2 cache flushed before each (as ``triton.testing.do_bench`` does).
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from ._contestants import CONTESTANTS, Problem, Runner, Settings

# Agreement with the reference in the same dtype: relative loss error, and gradient error
# relative to the largest gradient entry of the reference.
TOLERANCE = {"fp32": (1e-4, 2e-3), "bf16": (2e-2, 5e-2), "fp16": (1e-2, 2e-2)}
MIB = 1 << 20


def gemm_flops(N: int, n: int, k: int, mode: str) -> float:
    """GEMM FLOPs counted per call, as docs/design.md, section 4.2 counts them.

    One pass is ``2 N n k``; the forward is 1 pass, forward + backward 4 (the forward, its
    recompute and the two gradient GEMMs), whatever a contestant actually does.
    """
    return 2.0 * N * n * k * (1 if mode == "fwd" else 4)


# ----------------------------------------------------------------------------- memory (CPU)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Make glibc give freed memory back to the OS now and for the rest of the process."""
    libc = _libc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)  # large blocks: own mappings, unmapped on free
    libc.mallopt(m_trim_threshold, 64 * 1024)
    gc.collect()
    libc.malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_peak_delta_mib(fn: Callable[[], None], before: Callable[[], None]) -> float:
    """Peak resident memory ``fn`` adds over the resident set just before it, in MiB (NaN if unmeasurable)."""
    before()
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    if not _reset_hwm():
        return math.nan
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(peak - base, 0) / 1024.0


def cuda_peak_delta_mib(fn: Callable[[], None], before: Callable[[], None]) -> float:
    """Peak allocated CUDA memory ``fn`` adds over what was allocated before, in MiB."""
    before()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


# ----------------------------------------------------------------------------- timing


def time_cpu_ms(
    fn: Callable[[], None], before: Callable[[], None], reps: int, warmup: int, cpu_times: list[float] | None = None
) -> list[float]:
    """Wall-clock milliseconds of ``reps`` calls after ``warmup`` (``before`` runs untimed ahead of each).

    ``cpu_times``, if given, receives the CPU time of each call (all threads of the process,
    ``time.process_time``), in ms: on a machine shared with other jobs it varies less than
    the wall clock, which also counts the time the threads wait for a core.
    """
    for _ in range(warmup):
        before()
        fn()
    out = []
    for _ in range(reps):
        before()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
        if cpu_times is not None:
            cpu_times.append((time.process_time() - c0) * 1e3)
    return out


def time_cuda_ms(fn: Callable[[], None], before: Callable[[], None], reps: int, warmup: int) -> list[float]:
    """CUDA-event milliseconds of ``reps`` calls after ``warmup``, L2 flushed before each."""
    flush = torch.empty(256 * MIB, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        before()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i in range(reps):
        before()
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


# ----------------------------------------------------------------------------- agreement


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


def check_agreement(runner: Runner, problem: Problem, st: Settings, is_reference: bool) -> dict:
    """Loss and both gradients of ``runner`` against the reference on the same inputs.

    The reference runs with the contestant's own semantics (``runner.semantics``: a
    margin-free peer is compared with a margin-free reference). Returns the check columns.
    """
    if not runner.checkable:
        return {"check": "n/a (not a loss)", "agrees": None}
    if is_reference:
        return {"check": "yardstick", "agrees": True, "loss_err": 0.0, "grad_x_err": 0.0, "grad_w_err": 0.0}
    ref = CONTESTANTS["reference"].build(problem, st.with_semantics(**runner.semantics))
    ref.zero_grad()
    ref_loss = ref.loss()
    ref_loss.backward()
    rgx, rgw = (g.clone() for g in ref.grads())
    ref.zero_grad()
    del ref

    runner.zero_grad()
    loss = runner.loss()
    loss.backward()
    gx, gw = runner.grads()
    runner.zero_grad()
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
    errs = {"loss_err": loss_err, "grad_x_err": _rel(gx, rgx), "grad_w_err": _rel(gw, rgw)}
    tol_loss, tol_grad = TOLERANCE[st.dtype]
    agrees = bool(loss_err <= tol_loss and errs["grad_x_err"] <= tol_grad and errs["grad_w_err"] <= tol_grad)
    semantics = ", ".join(f"{k}={v}" for k, v in runner.semantics.items())
    check = ("ok" if agrees else "DISAGREES") + (f" (vs reference with {semantics})" if semantics else "")
    return {"check": check, "agrees": agrees, "reference_loss": ref_loss.item(), "loss": loss.item(), **errs}


# ----------------------------------------------------------------------------- one case


def _stats(prefix: str, times: list[float]) -> dict:
    return {
        f"{prefix}_ms": statistics.median(times),
        f"{prefix}_ms_min": min(times),
        f"{prefix}_ms_max": max(times),
    }


def run_case(case: dict) -> dict:
    """Check, time and measure one contestant on one settings; returns a flat result row.

    ``case``: ``contestant``, the :class:`Settings` fields, ``reps``, ``warmup``,
    ``measure_memory``, ``isolated`` (this process runs only this case). Errors are caught
    and reported in ``status`` / ``reason``.
    """
    settings_keys = Settings.__dataclass_fields__
    st = Settings(**{k: v for k, v in case.items() if k in settings_keys})
    contestant = CONTESTANTS[case["contestant"]]
    row: dict = {"contestant": contestant.name, "kind": contestant.kind, "status": "ok", "reason": ""}
    reason = contestant.unavailable(st)
    if reason:
        return {**row, "status": "unavailable", "reason": reason}
    cuda = st.device == "cuda"
    start = time.perf_counter()
    try:
        torch.manual_seed(st.seed)
        problem = Problem.make(st)
        runner = contestant.build(problem, st)
        row.update(check_agreement(runner, problem, st, contestant.name == "reference"))
        if row["agrees"] is False and not case.get("time_disagreeing", False):
            return {**row, "status": "wrong", "reason": "disagrees with the reference: not timed"}
        for mode, fn in (("fwd", runner.forward), ("fwd_bwd", runner.forward_backward)):
            if cuda:
                times = time_cuda_ms(fn, runner.zero_grad, case["reps"], case["warmup"])
            else:
                cpu_times: list[float] = []
                times = time_cpu_ms(fn, runner.zero_grad, case["reps"], case["warmup"], cpu_times)
                row[f"{mode}_cpu_ms"] = statistics.median(cpu_times)
            row.update(_stats(mode, times))
        if case.get("measure_memory", True):
            if not cuda and case.get("isolated", False):
                release_freed_memory()  # process-wide malloc settings: only in a process of our own
            peak = cuda_peak_delta_mib if cuda else cpu_peak_delta_mib
            row["mem_fwd_mib"] = peak(runner.forward, runner.zero_grad)
            row["mem_fwd_bwd_mib"] = peak(runner.forward_backward, runner.zero_grad)
        runner.zero_grad()
    except Exception as exc:  # a failing contestant is a result, not a crash of the run
        oom = cuda and isinstance(exc, torch.OutOfMemoryError)
        row.update(status="error", reason=("out of memory: " if oom else "") + _short(exc))
        row["traceback"] = traceback.format_exc(limit=6)[-2000:]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    row["case_wall_s"] = time.perf_counter() - start
    return row


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


def profile_case(case: dict, row_limit: int = 25) -> str:
    """Where one forward + backward spends its time and memory: a ``torch.profiler`` table (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    st = Settings(**{k: v for k, v in case.items() if k in Settings.__dataclass_fields__})
    reason = CONTESTANTS[case["contestant"]].unavailable(st)
    if reason:
        return f"{case['contestant']}: not run: {reason}"
    problem = Problem.make(st)
    runner = CONTESTANTS[case["contestant"]].build(problem, st)
    runner.forward_backward()
    runner.zero_grad()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if st.device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        runner.forward_backward()
        if st.device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if st.device == "cuda" else "self_cpu_time_total"
    head = f"{case['contestant']} N={st.N} n={st.n} D={st.D} k={st.k} {st.dtype}: one forward + backward"
    by_time = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=row_limit)
    by_mem = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_memory_usage", row_limit=12)
    return f"{head}\n\nby self time:\n{by_time}\nby memory allocated:\n{by_mem}"
