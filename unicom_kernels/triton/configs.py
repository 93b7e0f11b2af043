"""Block configurations of the Triton kernels, and how tests shrink them.

One :class:`TileConfig` per kernel family. The GPU defaults target Hopper/Ampere with the
short GEMM depth of this loss (``k`` = 256..512 after dimension selection) and a large class
count: 128 x 128 output tiles, a 64-deep K step, 8 warps (two warpgroups for ``wgmma``) and
3 pipeline stages (3 x (128 + 128) x 64 x 2 B = 96 KiB of shared memory in bf16, inside the
227 KiB of an H100/H200 and the 163 KiB of an A100). Under ``TRITON_INTERPRET=1`` every
program runs as NumPy on the CPU, where the tile size hardly matters for speed but small
tiles exercise the masking code, so the interpreter defaults are 32-wide.

Tests override the tiles with :func:`override_configs` (a context manager), e.g.
``with override_configs(block=16, workspace_bytes=4096): ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch parameters of one kernel.

    ``block_m`` x ``block_n`` is the output tile a program owns, ``block_k`` the depth of
    one ``tl.dot`` step of the reduction loop (all powers of two, >= 16 for ``tl.dot``).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class Configs:
    """Everything the launchers read.

    Attributes:
        lse: forward kernel: ``[block_m rows] x [block_n classes]`` logit tiles, K step
            (this field and the next three apply to bf16/fp16 operands).
        grad_logits: backward kernel that recomputes the logit tiles and writes the
            softmax-gradient workspace; its ``block_n`` is also the class-chunk granularity.
        grad_gemm: the gradient GEMMs, one launch: ``G @ W`` tiles of ``block_m`` rows x
            ``block_n`` feature dims (``block_k`` classes deep) and ``G^T @ X`` tiles of
            ``block_m`` classes x ``block_n`` feature dims (``block_k`` rows deep).
        fp32_tf32, fp32_ieee: the tile of every GEMM kernel for fp32 operands (see :meth:`tile`).
        combine_block: rows per program of the kernel that merges the forward partials (it
            also reads each row and its target prototype: 32 rows keep 128 programs at N = 4096).
        group_block: rows compared per step when the forward groups the rows by class.
        group_compare_rows: the most rows the forward groups by comparing every pair (``N^2``
            comparisons in its combine kernel, no launch of their own); larger batches use
            ``torch.sort`` (a few launches, ``O(N)``). An estimate: at 8192 rows the comparisons
            cost about as much as the sort's launches on an H100 (not measured).
        flatten_forward: ``tl.range(..., flatten=True)`` on the forward's class-tile loop
            (one software pipeline across tiles instead of one per tile). Off until measured:
            it compiles with triton 3.8 (and uses fewer registers there), but is unverified
            on the GPU machine's triton 3.6; ``benchmarks/bench_triton.py`` times both.
        target_programs: the forward splits the class tiles of a row block over enough
            programs to reach about this many programs (8 per SM on a 132-SM H100/H200);
            each split writes one (max, sum) partial per row.
        workspace_bytes: cap on the backward's softmax-gradient workspace
            ``[N, chunk]`` (the class dimension is processed in chunks that fit).
        workspace_follows_grad_x: raise that cap to the size of the fp32 ``grad_x`` (``N *
            k * 4`` bytes) when that is larger: with many rows a fixed cap would shrink the
            chunks and multiply the launches and the ``grad_x`` read-modify-write passes
            (at N = 65,536, k = 512: 13 chunks instead of 49), for at most the memory of a
            gradient that exists anyway. Off under the interpreter, whose tests force chunks.
    """

    lse: TileConfig = TileConfig(128, 64, 64)
    grad_logits: TileConfig = TileConfig(128, 64, 64)
    grad_gemm: TileConfig = TileConfig(128, 64, 64)
    fp32_tf32: TileConfig = TileConfig(128, 64, 32, num_warps=8, num_stages=3)
    fp32_ieee: TileConfig = TileConfig(128, 64, 16, num_warps=8, num_stages=2)
    combine_block: int = 32
    group_block: int = 128
    group_compare_rows: int = 8192
    flatten_forward: bool = False
    target_programs: int = 1056
    workspace_bytes: int = 40 << 20
    workspace_follows_grad_x: bool = True

    def tile(self, kernel: str, precision: str, fp32_operands: bool) -> TileConfig:
        """The tile of ``kernel`` (``"lse"``, ``"grad_logits"``, ``"grad_gemm"``).

        The three fields of that name apply to bf16/fp16 operands. fp32 operands take twice
        the registers and shared memory per element, and exact (``"ieee"``) fp32 dots run on
        the FMA units rather than the tensor cores, so they use ``fp32_tf32`` /
        ``fp32_ieee`` for every kernel (sizes chosen so that no kernel spills registers on
        sm_80 or sm_90, see ``benchmarks/kernel_report.py``).
        """
        if fp32_operands:
            return self.fp32_tf32 if precision == "tf32" else self.fp32_ieee
        return getattr(self, kernel)


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

GPU_CONFIGS = Configs()
_SMALL = TileConfig(32, 32, 32, num_warps=4, num_stages=2)
INTERPRETER_CONFIGS = Configs(
    lse=_SMALL,
    grad_logits=_SMALL,
    grad_gemm=_SMALL,
    fp32_tf32=_SMALL,
    fp32_ieee=_SMALL,
    combine_block=16,
    group_block=16,
    target_programs=64,
    workspace_follows_grad_x=False,
)

_active: Configs | None = None


def get_configs() -> Configs:
    """The configs in force: an override, else the interpreter's or the GPU's defaults."""
    if _active is not None:
        return _active
    return INTERPRETER_CONFIGS if INTERPRETING else GPU_CONFIGS


@contextlib.contextmanager
def override_configs(
    configs: Configs | None = None, *, block: int | None = None, **fields: object
) -> Iterator[Configs]:
    """Temporarily replace the configs (tests, tuning).

    Args:
        configs: a full :class:`Configs` to start from (default: the current ones).
        block: if given, every tile becomes ``block x block x block`` (4 warps, 2 stages).
        **fields: any other :class:`Configs` field, e.g. ``workspace_bytes=4096``.
    """
    global _active
    new = configs if configs is not None else get_configs()
    if block is not None:
        tile = TileConfig(block, block, block, num_warps=4, num_stages=2)
        new = dataclasses.replace(new, lse=tile, grad_logits=tile, grad_gemm=tile, fp32_tf32=tile, fp32_ieee=tile)
    new = dataclasses.replace(new, **fields)
    previous, _active = _active, new
    try:
        yield new
    finally:
        _active = previous
