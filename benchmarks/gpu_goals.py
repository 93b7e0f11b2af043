"""Shape A against its goals on one CUDA device: checked, timed, judged (the first step of gpu_check.sh).

Shape A: N = 4096 rows, n = 12,500 sampled classes, fp32 inputs, bf16 GEMMs, s = 64, ArcFace
m = 0.5, at K = 256 and K = 512 kept dims (the goals are judged at K = 512, shape A itself).
Each timed variant (forward; forward + backward; eager and replayed from a CUDA graph) is first
run once and checked against float64 (the ``torch`` backend in float64 on the same inputs: loss
and both gradients); a variant that fails its check is reported and not timed. Times are
medians of ``triton.testing.do_bench`` (eager) and ``triton.testing.do_bench_cudagraph`` (graph).
Transient memory is the peak of one forward + backward minus what exists without the loss
(inputs) and what it returns (loss and gradients). Every CSV row is written and flushed as soon
as it is measured, so a run cut short keeps what it measured. The last lines are one
``PASS``/``FAIL`` per goal: forward <= 85 us, forward + backward <= 350 us (eager), transient
memory <= 64 MB; after them, the tuning variants of ``benchmarks/bench_triton.py`` named by
``--tuning`` (default: 128 x 128 tiles at one block per SM) are timed at K = 512 (forward +
backward, CUDA graph), checked first, beside the default: A/B data, not judged.

Usage: ``python benchmarks/gpu_goals.py --csv out.csv [--commit SHA] [--k 256 512] [--rep-ms 100]``.
Exit status: 0 if every goal passes, 1 if one fails or a check fails, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE_A = dict(N=4096, n=12_500)
LOSS = dict(scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through")
GOALS = {"forward_us": 85.0, "forward_backward_us": 350.0, "transient_mb": 64.0}
GOAL_K = 512
# Against float64: |loss error| / max(|loss|, 1) and the relative L2 error of each gradient.
# bf16 operands (8 bits) put eager bf16 autograd at ~3e-3 on the gradients.
LOSS_TOL, GRAD_TOL = 5e-3, 2e-2


def inputs(N: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen)
    target = torch.randint(0, n, (N,), device="cuda", generator=gen)
    return x, w, target


def loss_fn(backend: str) -> Callable[..., torch.Tensor]:
    from unicom_kernels.ops import get_backend, mean_loss

    module = get_backend(backend, torch.device("cuda"))
    return lambda x, w, target, dtype: mean_loss(module, x, w, target, compute_dtype=dtype, **LOSS)


def errors(outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Error of ``(loss[, grad_x, grad_w])`` against the float64 ``reference``."""
    loss, ref = outputs[0].double(), reference[0]
    out = {"loss_err": float((loss - ref).abs() / ref.abs().clamp_min(1.0))}
    for name, got, want in zip(("grad_x_err", "grad_w_err"), outputs[1:], reference[1:], strict=False):
        out[name] = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
    return out


def passes(errs: dict[str, float]) -> bool:
    return errs["loss_err"] <= LOSS_TOL and all(v <= GRAD_TOL for k, v in errs.items() if k.startswith("grad"))


def graphed(fn: Callable[[], tuple[torch.Tensor, ...]]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """``fn`` captured in a CUDA graph: each call replays it and returns its (static) outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up outside the capture (compilation, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()

    def replay() -> tuple[torch.Tensor, ...]:
        graph.replay()
        return static

    return replay


def transient_mb(fn: Callable, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> float:
    """Peak memory of one forward + backward beyond the inputs and the returned loss and gradients."""
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.autograd.grad(fn(xg, wg, target, torch.bfloat16), (xg, wg))  # warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn(xg, wg, target, torch.bfloat16)
    grads = torch.autograd.grad(loss, (xg, wg))
    torch.cuda.synchronize()
    returned = loss.numel() * loss.element_size() + sum(g.numel() * g.element_size() for g in grads)
    return (torch.cuda.max_memory_allocated() - base - returned) / 1e6


class Rows:
    """CSV rows, each written and flushed at once (and printed)."""

    def __init__(self, path: Path | None, fixed: dict[str, object]) -> None:
        self.fixed, self.rows = fixed, []
        self.file = path.open("w", newline="") if path else None
        self.writer = None

    def add(self, **row: object) -> None:
        row = {**self.fixed, **row}
        self.rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if self.file is None:
            return
        if self.writer is None:  # every row has the same keys, in this order
            fields = [*self.fixed, "K", "variant", "mode", "loss_err", "grad_x_err", "grad_w_err", "check",
                      "median_us", "transient_mb", "error"]  # fmt: skip
            self.writer = csv.DictWriter(self.file, fieldnames=fields, restval="")
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()


def _reference(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(loss, grad_x, grad_w)`` of the ``torch`` backend in float64."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    loss64 = loss_fn("torch")(x64, w64, target, torch.float64)
    return (loss64.detach(), *torch.autograd.grad(loss64, (x64, w64)))


def _forward_backward(fn: Callable, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> Callable:
    """A training step's loss work on copies of ``x``, ``w``: ``() -> (loss, grad_x, grad_w)``."""
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step() -> tuple[torch.Tensor, ...]:
        loss = fn(xg, wg, target, torch.bfloat16)
        return (loss.detach(), *torch.autograd.grad(loss, (xg, wg)))

    return step


def _check_and_time(
    rows: Rows, k: int, variant: str, mode: str, body: Callable, reference: tuple[torch.Tensor, ...], rep_ms: int
) -> None:
    """One row: ``body`` (eager, or replayed from a CUDA graph) checked against ``reference``, then timed
    if it passes. A failure of any kind becomes a FAIL row, so one broken variant costs no other its row."""
    import triton.testing

    try:
        run = graphed(body) if mode == "graph" else body
        errs = errors(run(), reference)
        if not passes(errs):
            rows.add(K=k, variant=variant, mode=mode, check="FAIL", **errs)
            return
        if mode == "graph":
            median = triton.testing.do_bench_cudagraph(body, rep=rep_ms, return_mode="median")
        else:
            median = triton.testing.do_bench(body, warmup=10, rep=rep_ms, return_mode="median")
        rows.add(K=k, variant=variant, mode=mode, check="ok", median_us=median * 1e3, **errs)
    except Exception as exc:
        rows.add(K=k, variant=variant, mode=mode, check="FAIL", error=f"{type(exc).__name__}: {exc}"[:200])


def measure_k(k: int, rows: Rows, rep_ms: int) -> None:
    x, w, target = inputs(SHAPE_A["N"], SHAPE_A["n"], k)
    fn = loss_fn("triton")
    reference = _reference(x, w, target)

    def forward() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return (fn(x, w, target, torch.bfloat16),)

    step = _forward_backward(fn, x, w, target)
    for variant, body, wanted in (("forward", forward, 1), ("forward_backward", step, 3)):
        for mode in ("eager", "graph"):
            _check_and_time(rows, k, variant, mode, body, reference[:wanted], rep_ms)
    try:  # a failure here must not cost the verdict lines of the timings above
        rows.add(K=k, variant="memory", mode="eager", check="ok", transient_mb=transient_mb(fn, x, w, target))
    except Exception as exc:
        rows.add(K=k, variant="memory", mode="eager", check="FAIL", error=f"{type(exc).__name__}: {exc}"[:200])


def measure_tuning(k: int, rows: Rows, rep_ms: int, names: tuple[str, ...]) -> None:
    """Forward + backward replayed from a CUDA graph under the configs of ``benchmarks/bench_triton.py``'s
    tuning variants ``names`` (A/B data beside the default's rows), each checked against float64 first."""
    from benchmarks.bench_triton import _tuning_variants
    from unicom_kernels.triton import override_configs

    x, w, target = inputs(SHAPE_A["N"], SHAPE_A["n"], k)
    reference, step = _reference(x, w, target), _forward_backward(loss_fn("triton"), x, w, target)
    variants = _tuning_variants()
    for name in names:
        if name not in variants:
            rows.add(K=k, variant=f"forward_backward[{name}]", mode="graph", check="FAIL", error="no such variant")
            continue
        with override_configs(**variants[name]):
            _check_and_time(rows, k, f"forward_backward[{name}]", "graph", step, reference, rep_ms)


def goal_lines(rows: list[dict]) -> list[tuple[bool, str]]:
    """``(passed, line)`` per goal, from the eager rows at :data:`GOAL_K` (a missing row fails)."""

    def value(variant: str, field: str) -> float | None:
        found = [r.get(field) for r in rows if r["K"] == GOAL_K and r["variant"] == variant and r["mode"] == "eager"]
        return found[0] if found else None

    lines = []
    for goal, (variant, field, unit) in {
        "forward_us": ("forward", "median_us", "us"),
        "forward_backward_us": ("forward_backward", "median_us", "us"),
        "transient_mb": ("memory", "transient_mb", "MB"),
    }.items():
        got, limit = value(variant, field), GOALS[goal]
        ok = got is not None and got <= limit
        shown = "not measured" if got is None else f"{got:.1f} {unit}"
        lines.append(
            (ok, f"{'PASS' if ok else 'FAIL'} {variant} at shape A (K={GOAL_K}): {shown} (goal <= {limit:g} {unit})")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"), help="the commit measured")
    parser.add_argument("--k", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument(
        "--tuning", nargs="*", default=["triton-tile128"],
        help="bench_triton tuning variants timed at K=512 after the verdicts (A/B data; not judged)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_goals: no CUDA device is visible; nothing measured", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET (or set it to 0) to time compiled kernels")
    import triton

    fixed = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 commit=args.commit)  # fmt: skip
    rows = Rows(args.csv, fixed)
    for k in args.k:
        measure_k(k, rows, args.rep_ms)
    failed_checks = any(r["check"] == "FAIL" for r in rows.rows)
    results = goal_lines(rows.rows)
    for _, line in results:
        print(line, flush=True)
    # After the verdicts, so that a slot running out of time cuts these rows, not the verdicts.
    measure_tuning(GOAL_K, rows, args.rep_ms, tuple(args.tuning))
    return 0 if all(ok for ok, _ in results) and not failed_checks else 1


if __name__ == "__main__":
    sys.exit(main())
