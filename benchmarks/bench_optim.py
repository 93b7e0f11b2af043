"""Prototype optimizer step: dense ``torch.optim`` against the row-sparse optimizers, side by side.

``python -m benchmarks.bench_optim`` (CPU, defaults C = 1,000,000, D = 512, class_sample_rate
0.1, fp32) times, in one process:

- ``grad:dense`` / ``grad:compact``: the backward of gathering the sampled rows, which either
  materialises the dense ``[C, D]`` prototype gradient (autograd's ``index_select``) or keeps
  the compact ``[n, D]`` one (:class:`unicom_kernels.row_grad.RowGrad`);
- ``step:<optimizer>-dense`` / ``-sparse``: one optimizer step of ``torch.optim.AdamW`` / ``SGD``
  on the dense gradient against ``SparseRowAdamW`` / ``SparseRowSGD`` on the compact one.

Each row: median/min/max milliseconds of ``--reps`` calls after a warm-up (which also creates
the optimizer state), the peak memory a call adds, and what it holds (gradient + optimizer
state). The CPU run writes ``<name>.json`` and ``<name>.md`` under ``--out-dir``;
``--device cuda`` prints one CSV row per measurement instead (for a GPU check script).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from unicom_kernels import DualPartialMarginLoss
from unicom_kernels.optim import SparseRowAdamW, SparseRowSGD
from unicom_kernels.row_grad import RowGrad
from unicom_kernels.sampling import sample_classes, step_keys

from . import _report
from ._measure import MIB, cpu_peak_delta_mib, cuda_peak_delta_mib, time_cpu_ms, time_cuda_ms

FIELDS = ("measurement", "device", "C", "D", "n", "median_ms", "min_ms", "max_ms", "peak_added_mib", "holds_mib")
# Dense torch optimizer and row-sparse optimizer per name, with the same hyperparameters.
OPTIMIZERS: dict[str, tuple[Callable, Callable]] = {
    "adamw": (
        lambda weight: torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0),
        lambda criterion: SparseRowAdamW(criterion, lr=1e-3),
    ),
    "sgd": (
        lambda weight: torch.optim.SGD([weight], lr=0.1, momentum=0.9),
        lambda criterion: SparseRowSGD(criterion, lr=0.1, momentum=0.9),
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--classes", type=int, default=1_000_000, help="prototype rows C")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim D")
    parser.add_argument("--rate", type=float, default=0.1, help="class_sample_rate")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="CPU: folder for files")
    parser.add_argument("--name", default=f"optim-cpu-{today}", help="CPU: file stem of the .json/.md")
    return parser.parse_args(argv)


class Bench:
    """The prototypes, the step's sampled rows and their gradient, and the device's timers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device, self.reps = args.device, args.reps
        torch.manual_seed(0)
        self.criterion = DualPartialMarginLoss(args.classes, args.dim, device=args.device)
        self.weight = self.criterion.weight
        keys = step_keys(0, torch.zeros((), dtype=torch.int64, device=args.device), 0, args.classes)
        no_positives = torch.full((1,), -1, dtype=torch.int64, device=args.device)
        self.index = sample_classes(no_positives, keys, args.rate)  # as the module samples a step
        self.grad = torch.randn(self.index.numel(), args.dim, device=args.device)
        self.rows: list[dict] = []
        self.echo: Callable[[dict], None] | None = None  # called with each row as soon as it is measured

    def measure(self, name: str, fn: Callable[[], None], before: Callable[[], None], holds: float) -> None:
        cuda = self.device == "cuda"
        times = (time_cuda_ms if cuda else time_cpu_ms)(fn, before, self.reps, 1)
        peak = (cuda_peak_delta_mib if cuda else cpu_peak_delta_mib)(fn, before)
        C, D = self.weight.shape
        row = dict(measurement=name, device=self.device, C=C, D=D, n=self.index.numel())
        row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))
        row.update(peak_added_mib=peak, holds_mib=holds)
        self.rows.append(row)
        if self.echo is not None:
            self.echo(row)

    def gradients(self) -> None:
        """Backward of the gathered rows: dense ``weight.grad`` against the compact one."""
        sink = RowGrad()

        def dense() -> None:
            self.weight.index_select(0, self.index).backward(self.grad)

        def compact() -> None:
            sink.gather(self.weight, self.index).backward(self.grad)

        def clear() -> None:
            self.weight.grad = None
            sink.clear()

        self.measure("grad:dense", dense, clear, _mib(self.weight))
        self.measure("grad:compact", compact, clear, _mib(self.grad) + _mib(self.index))
        clear()

    def steps(self, name: str) -> None:
        """One optimizer step, dense (on the dense gradient) then row-sparse (on the compact one)."""
        make_dense, make_sparse = OPTIMIZERS[name]
        self.weight.grad = torch.zeros_like(self.weight).index_copy_(0, self.index, self.grad)
        dense = make_dense(self.weight)
        dense.step()  # creates the state, so that it counts in what the step holds
        self.measure(f"step:{name}-dense", dense.step, _nothing, _mib(self.weight.grad) + _state_mib(dense))
        self.weight.grad = None
        del dense
        self.free()

        sparse = make_sparse(self.criterion)

        def refill() -> None:  # a step consumes the compact gradient: hand it the same one again
            self.criterion.row_grad.add(self.index, self.grad)

        refill()
        sparse.step()
        holds = _mib(self.grad) + _mib(self.index) + _state_mib(sparse)
        self.measure(f"step:{name}-sparse", sparse.step, refill, holds)
        del sparse  # detaches from the prototypes: the next optimizer takes them over
        self.free()

    def free(self) -> None:
        """Hand the memory of the optimizer just measured back before the next one."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _nothing() -> None:
    pass


def _mib(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / MIB


def _state_mib(optimizer: torch.optim.Optimizer) -> float:
    return sum(_mib(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def add_ratios(rows: list[dict]) -> None:
    """``x_dense``: the dense measurement's median over this one's, for each sparse/compact row."""
    by_name = {r["measurement"]: r for r in rows}
    for row in rows:
        name = row["measurement"]
        dense = by_name.get(name.replace("-sparse", "-dense").replace("compact", "dense"))
        row["x_dense"] = dense["median_ms"] / row["median_ms"] if dense and row["median_ms"] > 0 else None


def markdown(rows: list[dict], meta: dict) -> str:
    head = rows[0]
    lines = [
        f"**{meta['device_name']}** ({meta['device']}, {meta['torch_threads']} torch threads), {meta['date_utc']}, "
        f"torch {meta['torch']}, commit `{meta['git_commit'][:12]}`, load average at start "
        f"{(meta.get('load_avg_start') or [math.nan])[0]:.2f}.",
        "",
        f"`{meta['command']}`",
        "",
        f"C = {head['C']:,} prototypes, D = {head['D']}, n = {head['n']:,} sampled rows, fp32. Time: median "
        f"[min-max] of {meta['reps']} calls after a warm-up. Peak added: memory a call adds at its peak (CPU: "
        "resident-set high-water mark over the resident set before; memory the allocator already held counts "
        "as zero). Holds: gradient + optimizer state kept between steps. "
        "× dense: the dense row's median time over this row's.",
        "",
        "| measurement | time | peak added | holds | × dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['x_dense']:.1f}×" if r.get("x_dense") else "–"
        span = f"{_report._ms(r['median_ms'])} [{_report._ms(r['min_ms'])}-{_report._ms(r['max_ms'])}]"
        lines.append(
            f"| {r['measurement']} | {span} | {r['peak_added_mib']:.0f} MiB | {r['holds_mib']:.0f} MiB | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_optim: --device cuda needs a CUDA device, none is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    if args.device == "cuda":  # a short GPU slot: each row reaches stdout as soon as it is measured
        writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        bench.echo = lambda row: (writer.writerow(row), sys.stdout.flush())
    bench.gradients()
    for name in OPTIMIZERS:
        bench.steps(name)
    add_ratios(bench.rows)
    if args.device == "cuda":
        ratios = csv.DictWriter(sys.stdout, ("measurement", "x_dense"), extrasaction="ignore", lineterminator="\n")
        ratios.writeheader()
        ratios.writerows(r for r in bench.rows if "x_dense" in r)
        return 0
    meta = _report.metadata(args.device, [], None)
    meta.update(command=" ".join(["python", "-m", "benchmarks.bench_optim", *(argv or sys.argv[1:])]), reps=args.reps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _report._atomic_write(out / f"{args.name}.json", json.dumps({"meta": meta, "rows": bench.rows}, indent=1) + "\n")
    text = markdown(bench.rows, meta)
    _report._atomic_write(out / f"{args.name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
