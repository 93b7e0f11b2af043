"""Print what the compiler made of every Triton kernel, and a modelled shape-A step on sm_90.

Runs on any machine (no GPU needed). First table: each kernel specialisation the launchers
use on a GPU (:data:`unicom_kernels.triton.configs.GPU_CONFIGS`, every operand dtype and dot
precision) is compiled for each requested architecture with ``triton.compile``; registers
and spills come from ``cuobjdump --dump-resource-usage`` (the copy in Triton's package) on
the cubin; "cp.async" says asynchronous copies are used, "ld_pipe" that copies stay in
flight across waits (``cp.async.wait_group N``, N > 0: a software-pipelined loop).

Then, for each ``--k``, the model of :mod:`benchmarks._kernel_model`: every launch of one
forward + backward at shape A (N = 4096, n = 12,500, bf16, s = 64, m = 0.5) as the launchers
make it, with the sm_90 compile of each, occupancy, waves, FLOPs, ideal HBM bytes, the torch
glue, a modelled (not measured) time beside the goals (with the tensor cores at the model's
efficiency ladder, and at a flat 65 % with the floor of the GEMM passes alone), the floor of
any design that recomputes the softmax within the memory goal
(:func:`benchmarks._kernel_model.design_bounds`), and the transient memory of the step from
the launchers' own allocations.

Usage: ``python benchmarks/kernel_report.py [--arch 80 90] [--json out.jsonl] [--filter bf16]
[--k 256 512] [--model-only | --no-model]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Interpreted kernels cannot be compiled: this must precede any Triton kernel import.
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _kernel_model  # noqa: E402
from unicom_kernels.triton import aot  # noqa: E402

COLUMNS = (
    ("kernel", 44),
    ("arch", 6),
    ("warps", 5),
    ("stages", 6),
    ("smem_KiB", 8),
    ("regs", 4),
    ("stack_B", 7),
    ("local_B", 7),
    ("wgmma", 5),
    ("mma", 5),
    ("cp.async", 8),
    ("ld_pipe", 7),
)
MODEL_COLUMNS = (
    ("kernel", 30),
    ("n", 2),
    ("grid", 7),
    ("warps", 5),
    ("regs", 4),
    ("smem_KiB", 8),
    ("blk/SM", 11),
    ("waves", 5),
    ("wave_eff", 8),
    ("pipelined", 16),
    ("GFLOP", 6),
    ("MB_min", 6),
    ("tc_eff", 6),
    ("model_us", 8),
)
GLUE_COLUMNS = (("torch op", 30), ("n", 2), ("MB", 7), ("model_us", 8))


def _row(r: dict) -> list[str]:
    if "error" in r:
        return [r["kernel"], r["arch"], "ERROR: " + r["error"].splitlines()[0][:80]]
    return [
        r["kernel"],
        r["arch"],
        str(r["num_warps"]),
        str(r["num_stages"]),
        f"{r['shared_bytes'] / 1024:.0f}",
        str(r["registers"]),
        str(r["stack_bytes"]),
        str(r["local_bytes"]),
        "yes" if r["wgmma"] else "-",
        "yes" if r["mma"] else "-",
        "yes" if r["pipelined"] else "-",
        "yes" if r["loads_pipelined"] else "-",
    ]


def _line(cells: list[str], columns: tuple[tuple[str, int], ...]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, columns, strict=False))


def _model_row(r: dict) -> list[str]:
    waits = f"cp{max(r['copy_waits'], default='-')}/mma{max(r['mma_waits'], default='-')}"
    return [
        r["kernel"],
        str(r["launches"]),
        "x".join(map(str, r["grid"])),
        str(r["num_warps"]),
        str(r["registers"]),
        f"{r['shared_bytes'] / 1024:.0f}",
        f"{r['blocks_per_sm']} ({r['occupancy_limit']})",
        f"{r['waves']:.2f}",
        f"{r['wave_efficiency']:.2f}",
        f"{'yes' if r['pipelined'] else 'no'} {waits}" if r["async_copies"] else "no (no cp.async)",
        f"{r['flops'] / 1e9:.1f}",
        f"{r['hbm_bytes_ideal'] / 1e6:.1f}",
        "-" if r["tc_efficiency"] is None else f"{r['tc_efficiency']:.2f}",
        f"{r['model_us']:.1f}",
    ]


def print_model(m: dict) -> None:
    """The shape-A model at one ``K``: kernel rows, torch glue, launch counts and modelled totals."""
    M = _kernel_model
    shape = ", ".join(f"{k}={v}" for k, v in M.SHAPE_A.items())
    print(f"\nshape A ({shape}, K={m['K']}, bf16 operands), sm_{M.ARCH} with {M.SMS} SMs -- MODEL, not measured")
    print(
        f"  time = max(FLOP / ({M.PEAK_TENSOR_FLOPS / 1e12:.0f} TFLOP/s x tc_eff) / wave_eff, MB_min / "
        f"{M.HBM_BYTES_PER_S / 1e12:.1f} TB/s, integer ops / {M.INT_OPS_PER_S / 1e12:.1f} Tops/s) + "
        f"{M.LAUNCH_S * 1e6:.0f} us per launch; tc_eff = "
        f"{M.EFF_PIPELINED} pipelined at >= 2 blk/SM, {M.EFF_PIPELINED_ONE_BLOCK} at 1 blk/SM, "
        f"{M.EFF_NOT_PIPELINED} unpipelined"
    )
    print("  MB_min: ideal minimum HBM traffic (each operand read once, each result written once: L2 reuse ideal)")
    t = m["totals"]
    for phase in ("forward", "backward"):
        print(f"\n  {phase}: Triton kernels")
        print("  " + _line([name for name, _ in MODEL_COLUMNS], MODEL_COLUMNS))
        for r in m["kernels"]:
            if r["phase"] == phase:
                print("  " + _line(_model_row(r), MODEL_COLUMNS))
        print(f"  {phase}: torch glue (aten ops that launch a kernel; sort may launch several; MB: operands + results)")
        print("  " + _line([name for name, _ in GLUE_COLUMNS], GLUE_COLUMNS))
        for r in m["glue"]:
            if r["phase"] == phase:
                cells = [r["op"], str(r["launches"]), f"{r['bytes'] / 1e6:.1f}", f"{r['model_us']:.1f}"]
                print("  " + _line(cells, GLUE_COLUMNS))
        triton_n, torch_n = t[f"{phase}_triton_launches"], t[f"{phase}_torch_launches"]
        print(f"  {phase} launches: {triton_n + torch_n} ({triton_n} Triton + {torch_n} torch)")
    print(
        f"\n  K={m['K']} modelled, not measured: forward {t['forward_model_us']:.0f} us "
        f"(goal {t['goal_forward_us']:.0f} us; launch cost {t['forward_launch_us']:.0f} us of it), "
        f"forward+backward {t['step_model_us']:.0f} us (goal {t['goal_step_us']:.0f} us; "
        f"launch cost {t['step_launch_us']:.0f} us of it)"
    )
    print(
        f"  K={m['K']} with every GEMM at {t['goal_eff']:.0%} of the peak (modelled): forward "
        f"{t['forward_model_us_at_goal_eff']:.0f} us, forward+backward {t['step_model_us_at_goal_eff']:.0f} us; "
        f"the GEMM passes alone at {t['goal_eff']:.0%}, perfect waves, no launch: {t['step_gemm_floor_us']:.0f} us"
    )
    kept = "recomputed" if t["bound_recomputes"] else "kept from the forward"
    print(
        f"  K={m['K']} floor of a design without atomics whose backward softmax ({t['softmax_mb']:.0f} MB in "
        f"16 bits, goal {t['goal_transient_mb']:.0f} MB) is {kept} (modelled): the GEMM passes at "
        f"{t['goal_eff']:.0%} with perfect waves and at least {t['bound_forward_launches']} forward + "
        f"{t['bound_backward_launches']} backward launches: forward {t['bound_forward_us']:.0f} us, "
        f"forward+backward {t['bound_step_us']:.0f} us; keeping the {t['bound_kept_share']:.0%} of it "
        f"that fits: {t['bound_step_keeping_us']:.0f} us"
    )
    print(
        f"  K={m['K']} transient memory of forward + backward (the launchers' allocations, counted on the CPU): "
        f"{t['transient_mb']:.1f} MB (goal {t['goal_transient_mb']:.0f} MB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--filter", default="", help="compile table: only kernels whose name contains this")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON object per line here")
    parser.add_argument("--k", type=int, nargs="+", default=[256, 512], help="kept dims of the shape-A model")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--model-only", action="store_true", help="skip the compile table")
    only.add_argument("--no-model", action="store_true", help="skip the shape-A model")
    args = parser.parse_args()
    print(f"triton {aot.triton.__version__}, cuobjdump: {aot.cuobjdump_path() or 'not found'}")
    rows, failed = [], 0
    if not args.model_only:
        failed += _compile_table(args, rows)
    if not args.no_model:
        for k in args.k:
            try:
                m = _kernel_model.model(k)
            except Exception as exc:  # keep the compile table's rows: report the failure instead
                print(f"\nshape-A model at K={k} failed: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            print_model(m)
            rows += [dict(kind="model_kernel", K=k, **r) for r in m["kernels"]]
            rows += [dict(kind="model_glue", K=k, **r) for r in m["glue"]]
            rows.append(dict(kind="model_totals", K=k, **m["totals"]))
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 1 if failed else 0


def _compile_table(args: argparse.Namespace, rows: list[dict]) -> int:
    """Print (and append to ``rows``) one line per specialisation and arch; returns the failure count."""
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    failed = 0
    for spec in aot.specs():
        if args.filter not in spec.name:
            continue
        for arch in args.arch:
            try:
                r = aot.report(spec, arch)
            except Exception as exc:  # keep going: report every kernel
                r = dict(kernel=spec.name, arch=f"sm_{arch}", error=f"{type(exc).__name__}: {exc}")
                failed += 1
            rows.append(r)
            print(_line(_row(r), COLUMNS), flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
