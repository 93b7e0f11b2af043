"""Print what the compiler made of every Triton kernel: shared memory, registers, spills, wgmma.

Runs on any machine (no GPU needed): each kernel specialisation the launchers use on a GPU
(:data:`unicom_kernels.triton.configs.GPU_CONFIGS`, every operand dtype and dot precision)
is compiled for each requested architecture with ``triton.compile``; registers and spills
come from ``cuobjdump --dump-resource-usage`` (the copy in Triton's package) on the cubin.

Usage: ``python benchmarks/kernel_report.py [--arch 80 90] [--json out.jsonl] [--filter bf16]``
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
)


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
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON object per line here")
    args = parser.parse_args()
    print(f"triton {aot.triton.__version__}, cuobjdump: {aot.cuobjdump_path() or 'not found'}")
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    rows, failed = [], 0
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
            cells = _row(r)
            print("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=False)), flush=True)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
