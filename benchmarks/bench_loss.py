"""Microbenchmarks of the loss against the peers users would otherwise pick, side by side.

One command measures every contestant (see ``--list``) on every shape, checks each against
the reference on the same inputs before timing it, and writes
``benchmarks/results/<device>-<date>.{csv,json,md,png}``::

    python -m benchmarks.bench_loss --preset quick     # CPU, small shapes, ~1-2 minutes
    python -m benchmarks.bench_loss --preset cpu       # CPU, N=1024, D=512, n_sampled up to 50k
    python -m benchmarks.bench_loss --preset gpu       # CUDA: shape A (docs/design.md, section 4.1) + sweeps
    python -m benchmarks.bench_loss --N 512 --n 1000,4000 --D 256 --dim-ratio 0.5 \\
        --dtype fp32,bf16 --contestants torch,reference,pml --margin-type cosface --margin 0.35

Flags given next to a preset replace its values; any of ``--N --n --D --dim-ratio`` turns
the shapes into the product of the given lists (the preset's base shape fills the rest).
On the CPU each case runs in a fresh process (so its peak RSS can be measured); on CUDA
in this process. What is measured and how: :mod:`benchmarks._measure`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ._contestants import CONTESTANTS, DTYPES, Settings
from ._measure import profile_case, run_case
from ._report import add_derived, metadata, write_all

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_TAG = "RESULT "

# base: the shape every sweep varies one axis of; sweep: axis -> values.
PRESETS: dict[str, dict] = {
    "quick": {
        "device": "cpu",
        "dtype": ["fp32"],
        "base": {"N": 256, "n": 8192, "D": 128, "dim_ratio": 1.0},
        "sweep": {"n": [2048, 8192]},
        "reps": 3,
        "warmup": 1,
    },
    "cpu": {
        "device": "cpu",
        "dtype": ["fp32"],
        "base": {"N": 1024, "n": 50000, "D": 512, "dim_ratio": 1.0},
        "sweep": {"n": [6250, 12500, 25000, 50000]},
        "reps": 3,
        "warmup": 0,  # the agreement check's forward + backward is the warm-up on the CPU
    },
    "gpu": {
        "device": "cuda",
        "dtype": ["bf16"],
        "base": {"N": 4096, "n": 12500, "D": 512, "dim_ratio": 1.0},  # shape A
        "sweep": {
            "n": [3125, 6250, 12500, 25000, 50000, 100000],
            "D": [128, 256, 512, 1024],
            "dim_ratio": [0.25, 0.5, 1.0],
            "N": [1024, 2048, 4096, 8192, 16384],
        },
        "reps": 30,
        "warmup": 5,
    },
}
DEFAULTS = {"scale": 64.0, "margin": 0.5, "margin_type": "arcface", "margin_grad": "straight_through"}


def _ints(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_loss",
        description="Time and memory of the loss's backends and of its peers, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="a prepared set of shapes (default: gpu with --device cuda, else cpu)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's")
    p.add_argument("--N", type=_ints, help="rows (global batch), comma-separated")
    p.add_argument("--n", type=_ints, help="n_sampled: sampled classes, comma-separated")
    p.add_argument("--D", type=_ints, help="embedding dims, comma-separated")
    p.add_argument("--dim-ratio", type=_floats, help="fraction of the D dims kept, comma-separated")
    p.add_argument("--dtype", type=_names, help=f"embedding dtypes, comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--contestants", type=_names, help=f"comma-separated subset of: {', '.join(CONTESTANTS)}")
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"], help="s")
    p.add_argument("--margin", type=float, default=DEFAULTS["margin"], help="m (radians for arcface)")
    p.add_argument("--margin-type", choices=["arcface", "cosface", "none"], default=DEFAULTS["margin_type"])
    p.add_argument("--margin-grad", choices=["straight_through", "exact"], default=DEFAULTS["margin_grad"])
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of reference-compile")
    p.add_argument("--reps", type=int, help="timed repetitions per mode (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--time-disagreeing", action="store_true", help="time contestants that fail the agreement check")
    p.add_argument(
        "--isolate",
        choices=["auto", "process", "none"],
        default="auto",
        help="one fresh process per case (auto: on the CPU, where peak RSS needs it)",
    )
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (>1 disturbs the timings; for smoke tests)")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds before a case is given up")
    p.add_argument("--peak-tflops", type=float, help="dense peak of the device for %% of peak (default: known GPUs)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", help="file stem (default: <device>-<date>, plus -<preset> for quick/custom runs)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, help="re-write the CSV, markdown and plot of an earlier run's JSON")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of fwd+bwd per case instead")
    p.add_argument("--list", action="store_true", help="list the contestants and whether they can run here, then exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- plan


def shapes_of(args: argparse.Namespace, preset: dict) -> list[dict]:
    """The shapes to run: the preset's base and one-axis sweeps, or the product of the given lists."""
    base = preset["base"]
    given = {"N": args.N, "n": args.n, "D": args.D, "dim_ratio": args.dim_ratio}
    if any(v for v in given.values()):
        axes = {key: given[key] or [base[key]] for key in base}
        shapes = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    else:
        shapes = [dict(base)]
        for axis, values in preset["sweep"].items():
            shapes += [{**base, axis: v} for v in values]
    unique: list[dict] = []
    for shape in shapes:
        if shape not in unique:
            unique.append(shape)
    return unique


def plan(args: argparse.Namespace, preset: dict, device: str) -> list[dict]:
    """One case per (shape, dtype, contestant); the reference first in each group."""
    names = args.contestants or list(CONTESTANTS)
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        raise SystemExit(f"unknown contestant(s) {unknown}; choose from {list(CONTESTANTS)}")
    names = sorted(set(names), key=lambda n: (n != "reference", list(CONTESTANTS).index(n)))
    dtypes = args.dtype or preset["dtype"]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    cases = []
    for shape in shapes_of(args, preset):
        k = max(1, round(shape["dim_ratio"] * shape["D"]))
        for dtype in dtypes:
            settings = Settings(
                device=device,
                dtype=dtype,
                N=shape["N"],
                n=shape["n"],
                D=shape["D"],
                k=k,
                scale=args.scale,
                margin=args.margin,
                margin_type=args.margin_type,
                margin_grad=args.margin_grad,
                seed=args.seed,
                compile_backend=args.compile_backend,
            )
            for name in names:
                cases.append(
                    {
                        "contestant": name,
                        **settings.__dict__,
                        "reps": args.reps or preset["reps"],
                        "warmup": args.warmup if args.warmup is not None else preset["warmup"],
                        "measure_memory": not args.no_memory,
                        "time_disagreeing": args.time_disagreeing,
                    }
                )
    return cases


# ----------------------------------------------------------------------------- running


def run_isolated(case: dict, timeout: float) -> dict:
    """Run one case in a fresh Python process; its result comes back as one JSON line."""
    settings = Settings(**{k: v for k, v in case.items() if k in Settings.__dataclass_fields__})
    reason = CONTESTANTS[case["contestant"]].unavailable(settings)
    if reason:  # no process needed to say so
        return {
            "contestant": case["contestant"],
            "kind": CONTESTANTS[case["contestant"]].kind,
            "status": "unavailable",
            "reason": reason,
        }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)  # a worker measures real kernels or nothing
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", json.dumps({**case, "isolated": True})]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"contestant": case["contestant"], "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "contestant": case["contestant"],
        "status": "error",
        "reason": f"worker exited {proc.returncode}: {' / '.join(tail)[-300:]}",
    }


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and enabled:
        return tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)

    class _Plain:
        def __init__(self) -> None:
            self.done = 0

        def set_postfix_str(self, text: str) -> None:
            if enabled:
                print(f"[{self.done + 1}/{total}] {text}", file=sys.stderr, flush=True)

        def update(self, k: int = 1) -> None:
            self.done += k

        def close(self) -> None:
            pass

    return _Plain()


def _label(case: dict) -> str:
    return f"{case['contestant']} N={case['N']} n={case['n']} D={case['D']} k={case['k']} {case['dtype']}"


def run_all(cases: list[dict], isolate: bool, jobs: int, timeout: float, progress: bool) -> list[dict]:
    """Every case, in order; each result row carries its case's settings."""
    bar = _progress(len(cases), progress)
    rows: list[dict | None] = [None] * len(cases)

    def one(i: int) -> None:
        case = cases[i]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs on the machine skew timings
        result = run_isolated(case, timeout) if isolate else run_case(case)
        settings = {k: v for k, v in case.items() if k in Settings.__dataclass_fields__}
        rows[i] = {**settings, "reps": case["reps"], "load_1m": load, **result}

    try:
        if jobs <= 1:
            for i, case in enumerate(cases):
                bar.set_postfix_str(_label(case))
                one(i)
                bar.update(1)
        else:
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                futures = [pool.submit(one, i) for i in range(len(cases))]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(1)
    finally:
        bar.close()
    return [r for r in rows if r is not None]


def list_contestants(device: str) -> None:
    st = Settings(device, "fp32", 8, 8, 8, 8, 64.0, 0.5, "arcface", "straight_through")
    for c in CONTESTANTS.values():
        reason = c.unavailable(st)
        print(f"{c.name:18s} {c.kind:5s} {'runs' if not reason else 'NOT RUN: ' + reason}\n{'':24s} {c.description}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_case(json.loads(args.worker)), default=str), flush=True)
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        add_derived(data["rows"], args.peak_tflops)
        paths = write_all(data["rows"], data["meta"], args.from_json.parent, args.from_json.stem, not args.no_plot)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    preset_name = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    device = args.device or preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --preset quick/cpu on the CPU)")
    if args.list:
        list_contestants(device)
        return 0
    custom = any(v for v in (args.N, args.n, args.D, args.dim_ratio))
    if args.profile:
        for case in plan(args, preset, device):
            print(profile_case(case), flush=True)
        return 0
    isolate = args.isolate == "process" or (args.isolate == "auto" and device == "cpu")
    cases = plan(args, preset, device)
    meta = metadata(device, argv, None if custom else preset_name)
    meta.update(isolated=isolate, jobs=args.jobs)
    rows = run_all(cases, isolate, args.jobs, args.case_timeout, not args.no_progress)
    meta["load_avg_end"] = list(os.getloadavg())
    add_derived(rows, args.peak_tflops)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if (preset_name in ("cpu", "gpu") and not custom) else f"-{'custom' if custom else preset_name}"
    stem = args.name or f"{device}-{date}{suffix}"
    paths = write_all(rows, meta, args.out_dir, stem, plot=not args.no_plot)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
