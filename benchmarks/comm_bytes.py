"""Bytes each rank moves per training step in the model-parallel loss, ours vs Partial FC.

Computed, not measured: ring collectives, where an all-gather or reduce-scatter of a
``T``-byte result moves ``(W-1)/W * T`` bytes in and out of each rank and an all-reduce
of ``T`` bytes moves ``2 (W-1)/W * T``.

    python -m benchmarks.comm_bytes                 # shape A: N=4096, D=512, bf16, 8 ranks
    python -m benchmarks.comm_bytes --world 64 --rows 32768
"""

from __future__ import annotations

import argparse


def _ring(world: int, total: float, all_reduce: bool = False) -> float:
    return (2 if all_reduce else 1) * (world - 1) / world * total


def ours(world: int, rows: int, dim: int, elem: int) -> list[tuple[str, float]]:
    """Our collectives (unicom_kernels.distributed), per rank per step, in bytes."""
    return [
        ("agreement vector, int64 [W, 10]", _ring(world, world * 10 * 8)),
        ("labels all-gather, int64 [N]", _ring(world, rows * 8)),
        (f"embeddings all-gather, {elem}-byte [N, D]", _ring(world, rows * dim * elem)),
        ("(sum-exp, z_t) all-reduce, fp64 [2, N]", _ring(world, 2 * rows * 8, all_reduce=True)),
        (f"embedding-grad reduce-scatter, {elem}-byte [N, D]", _ring(world, rows * dim * elem)),
    ]


def partial_fc(world: int, rows: int, dim: int) -> list[tuple[str, float]]:
    """insightface PartialFC_V2 + DistCrossEntropy, per rank per step, in bytes."""
    return [
        ("labels all-gather, int64 [N]", _ring(world, rows * 8)),
        ("embeddings all-gather, fp32 [N, D]", _ring(world, rows * dim * 4)),
        ("max / sum-exp / target all-reduces, fp32 3 x [N]", 3 * _ring(world, rows * 4, all_reduce=True)),
        ("embedding-grad all-reduce, fp32 [N, D]", _ring(world, rows * dim * 4, all_reduce=True)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4096, help="global batch N")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--elem-bytes", type=int, default=2, help="embedding dtype size (bf16: 2)")
    args = parser.parse_args()
    print(f"per rank per step, N={args.rows}, D={args.dim}, W={args.world}\n")
    print("| implementation | collective | MB |\n|---|---|---:|")
    totals = {}
    for name, rows in (
        ("unicom-kernels", ours(args.world, args.rows, args.dim, args.elem_bytes)),
        ("Partial FC", partial_fc(args.world, args.rows, args.dim)),
    ):
        for what, size in rows:
            print(f"| {name} | {what} | {size / 1e6:.3f} |")
        totals[name] = sum(size for _, size in rows)
    for name, total in totals.items():
        print(f"| {name} | **total** | **{total / 1e6:.2f}** |")
    print(f"\nratio Partial FC / ours: {totals['Partial FC'] / totals['unicom-kernels']:.1f}x")


if __name__ == "__main__":
    main()
