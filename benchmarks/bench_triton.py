"""Time the margin-softmax backends side by side on one CUDA device (a sweep beyond gpu_check.sh's shape A).

For each shape (N rows, n sampled classes, D dims, dim ratio -> k = round(ratio * D)) and each
backend (triton, torch, reference), it measures the forward alone and forward + backward
with ``triton.testing.do_bench`` (CUDA events, median), the peak extra memory of one
forward + backward, and derived numbers: TFLOP/s with the convention of docs/design.md, section 4.2
(forward = one GEMM pass, 2*N*n*k FLOP; forward + backward = four passes), percent of a
dense bf16 peak (``--peak-tflops``, default the device's from ``benchmarks/_report.py``: 989
TFLOP/s on an H100 SXM or H200), and the
speed-up over the reference. The backends receive fp32 inputs and do the GEMMs in bf16
(``compute_dtype``), like shape A (s = 64, arcface m = 0.5).

Usage: ``python benchmarks/bench_triton.py [--csv out.csv] [--quick]``; prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _report  # noqa: E402  (after the path above: also run as a script)

# (name, N, n, D, dim ratio)
SHAPES = [
    ("A", 4096, 12500, 512, 1.0),
    ("A-k256", 4096, 12500, 512, 0.5),
    ("n3k", 4096, 3125, 512, 1.0),
    ("n50k", 4096, 50000, 512, 1.0),
    ("D1024-r0.5", 4096, 12500, 1024, 0.5),
    ("D768", 4096, 12500, 768, 1.0),
    ("D128", 4096, 12500, 128, 1.0),
]


def _tuning_variants() -> dict[str, dict]:
    """Triton config overrides timed beside the defaults at shape A (A/B data for tuning).

    Each compiles without register spills for sm_90 with triton 3.8 (kernel_report.py);
    a variant that fails on another Triton shows up as an error row, not a crash.
    """
    from unicom_kernels.triton import TileConfig

    wide = TileConfig(128, 128, 64, 8, 3)  # one block per SM (150-177 registers) against the default's two
    return {
        "triton-tile128": dict(lse=wide, grad_logits=wide, grad_gemm=wide),
        "triton-flat": dict(flatten_forward=True),  # one software pipeline across class tiles
        "triton-fwd256": dict(lse=TileConfig(128, 256, 64, 8, 3), flatten_forward=True),  # wider forward tiles
        "triton-ws128M": dict(workspace_bytes=128 << 20),  # one backward chunk at shape A
    }


def backend(name: str):
    """The backend's single-process loss (:func:`unicom_kernels.ops.mean_loss`).

    A name from :func:`_tuning_variants` is the triton backend run (forward and backward)
    under that config override.
    """
    variants = _tuning_variants()
    if name in variants:
        from unicom_kernels.triton import override_configs

        fn, overrides = backend("triton"), variants[name]

        def tuned(*args, **kwargs):
            with override_configs(**overrides):
                loss = fn(*args, **kwargs)
            return _OverriddenBackward(loss, overrides) if loss.requires_grad else loss

        return tuned
    from unicom_kernels.ops import get_backend, mean_loss

    return functools.partial(mean_loss, get_backend(name, torch.device("cuda")))


class _OverriddenBackward:
    """A loss whose ``backward()`` runs under the same config override as its forward."""

    def __init__(self, loss, overrides: dict):
        self.loss, self.overrides = loss, overrides

    def backward(self) -> None:
        from unicom_kernels.triton import override_configs

        with override_configs(**self.overrides):
            self.loss.backward()


def measure(fn, N: int, n: int, k: int, reps_ms: int) -> dict[str, float]:
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = F.normalize(torch.randn(N, k, device="cuda", generator=gen), dim=1)
    w = F.normalize(torch.randn(n, k, device="cuda", generator=gen), dim=1)
    target = torch.randint(0, n, (N,), device="cuda", generator=gen)
    kw = dict(
        scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through", compute_dtype=torch.bfloat16
    )
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def forward():
        return fn(x, w, target, **kw)

    def forward_backward():
        fn(xg, wg, target, **kw).backward()

    forward_backward()  # compile / warm up
    torch.cuda.synchronize()
    xg.grad = wg.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    xg.grad = wg.grad = None
    with torch.no_grad():
        fwd = triton.testing.do_bench(forward, warmup=10, rep=reps_ms, return_mode="median")
    fb = triton.testing.do_bench(forward_backward, warmup=10, rep=reps_ms, grad_to_none=[xg, wg], return_mode="median")
    return dict(fwd_us=fwd * 1e3, fwd_bwd_us=fb * 1e3, peak_mib=peak / 2**20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="shape A only")
    parser.add_argument("--backends", nargs="+", default=["triton", "torch", "reference"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: the device's dense bf16 peak")
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET (or set it to 0) to time compiled kernels")
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    peak = _report.peak_tflops("cuda", "bf16", args.peak_tflops) or float("nan")  # nan: an unknown device
    rows = []
    for name, N, n, D, ratio in SHAPES[:1] if args.quick else SHAPES:
        k = round(ratio * D)
        gemm = 2.0 * N * n * k
        ref_fb = None
        # Shape A also times the tuning variants (see _tuning_variants()).
        extra = list(_tuning_variants()) if name == "A" and "triton" in args.backends else []
        for b in [*args.backends, *extra]:
            row = dict(shape=name, N=N, n=n, D=D, ratio=ratio, k=k, backend=b)
            try:
                row.update(measure(backend(b), N, n, k, args.rep_ms))
                row["fwd_tflops"] = gemm / (row["fwd_us"] * 1e-6) / 1e12
                row["fwd_bwd_tflops"] = 4 * gemm / (row["fwd_bwd_us"] * 1e-6) / 1e12
                row["fwd_bwd_pct_peak"] = 100.0 * row["fwd_bwd_tflops"] / peak
                if b == "reference":
                    ref_fb = row["fwd_bwd_us"]
            except Exception as exc:  # e.g. out of memory for the reference: keep the sweep going
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
        for row in rows:
            if row["shape"] == name and ref_fb and "fwd_bwd_us" in row:
                row["speedup_vs_ref"] = ref_fb / row["fwd_bwd_us"]

    if args.csv:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # first-seen order
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    print("\nshape        k     n       backend       fwd_us   fb_us    fwd_TF  fb_TF  fb_%pk  peakMiB  x_ref")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<12} {r['k']:<5} {r['n']:<7} {r['backend']:<13} {r['error']}")
            continue
        print(
            f"{r['shape']:<12} {r['k']:<5} {r['n']:<7} {r['backend']:<13} {r['fwd_us']:<8.1f} {r['fwd_bwd_us']:<8.1f}"
            f" {r['fwd_tflops']:<7.0f} {r['fwd_bwd_tflops']:<6.0f} {r['fwd_bwd_pct_peak']:<7.1f}"
            f" {r['peak_mib']:<8.1f} {r.get('speedup_vs_ref', float('nan')):.1f}"
        )
    print("targets (docs/design.md 4.3, shape A, H100/H200): triton fwd <= 85 us, fwd+bwd <= 350 us, >= 10x reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
