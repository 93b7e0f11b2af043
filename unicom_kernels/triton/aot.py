"""Ahead-of-time compilation of every kernel for real GPUs, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel to
PTX and a cubin on any machine; this module does it for every kernel specialisation the
launchers use on a GPU (the :data:`~.configs.GPU_CONFIGS` tiles, each operand dtype, each
``tl.dot`` precision) and reads what the compiler produced: shared memory, registers,
spills (``cuobjdump`` from Triton's package on the cubin), whether the sm_90 PTX uses
``wgmma`` and how its loads are pipelined (:func:`pipelining`). :func:`report` compiles each
specialisation once per process. ``tests/test_triton_compile.py`` and
``benchmarks/kernel_report.py`` use it.

It must run with ``TRITON_INTERPRET`` unset or 0 (``@triton.jit`` then yields compilable
kernels), hence the command-line form: ``python -m unicom_kernels.triton.aot --arch 80 90``
prints one JSON object per compiled kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import unit_rows
from .configs import GPU_CONFIGS, Configs, TileConfig
from .grad_gemm import _grad_gemm_kernel
from .lse_forward import SUPPORTS_FLATTEN, _loss_finalize_kernel, _lse_combine_kernel, _lse_partial_kernel
from .softmax_grad import _softmax_grad_kernel
from .unit_rows import _unit_rows_grad_kernel, _unit_rows_kernel

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# (operand dtype, tl.dot input precision): what dot_precision() can pick on a GPU.
VARIANTS = (
    (torch.bfloat16, "ieee"),
    (torch.float16, "ieee"),
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
)


_DIVISIBLE_BY_16 = ("N", "K", "col0", "chunk_pad")


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation: the kernel, its argument types, its constexprs, its launch."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int | None  # None: Triton's default, as for a launch that does not pass it
    # Integer arguments known divisible by 16; None: the launchers' conventions (_DIVISIBLE_BY_16).
    divisible: tuple[str, ...] | None = None


def _tile_constexprs(tile: TileConfig, precision: str) -> dict[str, object]:
    return dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, UPCAST=False, DOT_PRECISION=precision)


def specs(configs: Configs = GPU_CONFIGS, variants=VARIANTS) -> Iterator[Spec]:
    """Every specialisation the launchers compile on a GPU with ``configs``."""
    i32, f32p, i64p = "i32", "*fp32", "*i64"
    for dtype, precision in variants:
        p = _PTR[dtype]
        tag = f"{str(dtype).removeprefix('torch.')}-{precision}"
        fp32 = dtype == torch.float32
        t = configs.tile("lse", precision, fp32)
        for flatten in (True, False) if SUPPORTS_FLATTEN else (False,):
            yield Spec(
                f"lse_partial[{tag},flatten={int(flatten)}]",
                _lse_partial_kernel,
                dict(
                    x_ptr=p,
                    w_ptr=p,
                    target_ptr=i64p,
                    max_ptr=f32p,
                    sum_ptr=f32p,
                    N=i32,
                    n=i32,
                    K=i32,
                    stride_x=i32,
                    stride_w=i32,
                    tiles_per_split=i32,
                    scale="fp32",
                ),
                dict(FLATTEN=flatten, **_tile_constexprs(t, precision)),
                t.num_warps,
                t.num_stages,
            )
        t = configs.tile("grad_logits", precision, fp32)
        for mean in (True, False):
            yield Spec(
                f"softmax_grad[{tag},mean={int(mean)}]",
                _softmax_grad_kernel,
                dict(
                    x_ptr=p,
                    w_ptr=p,
                    target_ptr=i64p,
                    lse_ptr=f32p,
                    rowscale_ptr=f32p,
                    g_ptr=p,
                    N=i32,
                    n=i32,
                    K=i32,
                    col0=i32,
                    chunk_pad=i32,
                    stride_x=i32,
                    stride_w=i32,
                    stride_g=i32,
                    scale="fp32",
                ),
                dict(MEAN=mean, **_tile_constexprs(t, precision)),
                t.num_warps,
                t.num_stages,
            )
        t = configs.tile("grad_gemm", precision, fp32)
        for first in (True, False):
            yield Spec(
                f"grad_gemm[{tag},first={int(first)}]",
                _grad_gemm_kernel,
                dict(
                    g_ptr=p,
                    x_ptr=p,
                    w_ptr=p,
                    grad_x_ptr=f32p,
                    grad_w_ptr=f32p,
                    N=i32,
                    K=i32,
                    col0=i32,
                    chunk=i32,
                    chunk_pad=i32,
                    w_programs=i32,
                    dim_blocks=i32,
                    stride_g=i32,
                    stride_x=i32,
                    stride_w=i32,
                    stride_gx=i32,
                    stride_gw=i32,
                ),
                dict(FIRST=first, **_tile_constexprs(t, precision)),
                t.num_warps,
                t.num_stages,
            )
    for dtype, _ in variants[:3]:  # the operand dtypes
        p = _PTR[dtype]
        # Every margin with the in-kernel grouping; the sorted variant (large N) once: the two
        # choices touch different code.
        for margin_code, group in ((0, True), (1, True), (2, True), (0, False)):
            yield Spec(
                f"lse_combine[{str(dtype).removeprefix('torch.')},margin={margin_code},group={int(group)}]",
                _lse_combine_kernel,
                dict(
                    max_ptr=f32p,
                    sum_ptr=f32p,
                    x_ptr=p,
                    w_ptr=p,
                    target_ptr=i64p,
                    lse_ptr=f32p,
                    row_loss_ptr=f32p,
                    tcoef_ptr=f32p,
                    zt_ptr=f32p,
                    dzdc_ptr=f32p,
                    order_ptr=i64p,
                    key_ptr=i64p,
                    N=i32,
                    n=i32,
                    K=i32,
                    S=i32,
                    stride_x=i32,
                    stride_w=i32,
                    scale="fp32",
                    margin="fp32",
                    cos_m="fp32",
                    sin_m="fp32",
                    sin_floor="fp32",
                ),
                dict(
                    MARGIN=margin_code,
                    EXACT=True,
                    GROUP=group,
                    BLOCK=configs.combine_block,
                    BLOCK_K=128,
                    BLOCK_G=configs.group_block,
                ),
                4,
                None,  # as launched: Triton's default stages
            )
    for raw in (torch.float32, torch.float16, torch.bfloat16):  # the embeddings' dtype; prototypes fp32
        r = str(raw).removeprefix("torch.")
        for stored, round_bf16 in (
            (torch.float32, False),
            (torch.float16, False),
            (torch.float16, True),
            (torch.bfloat16, True),
        ):
            s = str(stored).removeprefix("torch.")
            yield Spec(
                f"unit_rows[{r}->{s},round_bf16={int(round_bf16)}]",
                _unit_rows_kernel,
                dict(
                    x_ptr=_PTR[raw],
                    w_ptr=f32p,
                    xu_ptr=_PTR[stored],
                    wu_ptr=_PTR[stored],
                    x_norm_ptr=f32p,
                    w_norm_ptr=f32p,
                    N=i32,
                    n=i32,
                    K=i32,
                    K_OUT=i32,
                    stride_x=i32,
                    stride_w=i32,
                    stride_xu=i32,
                    stride_wu=i32,
                    x_programs=i32,
                    eps="fp32",
                ),
                dict(ROUND_BF16=round_bf16, BLOCK_R=unit_rows.BLOCK_R, BLOCK_K=256),
                4,
                None,  # as launched: Triton's default stages
            )
        for stored in (torch.float32, torch.float16, torch.bfloat16):
            for mean in (True, False):
                yield Spec(
                    f"unit_rows_grad[{r},src={str(stored).removeprefix('torch.')},mean={int(mean)}]",
                    _unit_rows_grad_kernel,
                    dict(
                        gx_ptr=f32p,
                        x_ptr=_PTR[raw],
                        x_norm_ptr=f32p,
                        x_out_ptr=_PTR[raw],
                        target_ptr=i64p,
                        wu_ptr=_PTR[stored],
                        gw_ptr=f32p,
                        w_ptr=f32p,
                        w_norm_ptr=f32p,
                        w_out_ptr=f32p,
                        order_ptr=i64p,
                        key_ptr=i64p,
                        xu_ptr=_PTR[stored],
                        tcoef_ptr=f32p,
                        gscale_ptr=f32p,
                        count_ptr=f32p,
                        N=i32,
                        n=i32,
                        K=i32,
                        stride_gx=i32,
                        stride_x=i32,
                        stride_xout=i32,
                        stride_wu=i32,
                        stride_gw=i32,
                        stride_w=i32,
                        stride_wout=i32,
                        stride_xu=i32,
                        x_programs=i32,
                        eps="fp32",
                    ),
                    dict(
                        MEAN=mean,
                        BLOCK_R=unit_rows.BLOCK_R,
                        X_BLOCK_K=256,
                        W_BLOCK_K=64,
                        BLOCK_Q=unit_rows.BLOCK_Q,
                        BLOCK_S=unit_rows.BLOCK_S,
                    ),
                    4,
                    None,
                )
    yield Spec(
        "loss_finalize",
        _loss_finalize_kernel,
        dict(row_loss_ptr=f32p, target_ptr=i64p, loss_ptr=f32p, count_ptr=f32p, N=i32),
        dict(BLOCK=1024),
        4,
        None,  # as launched: Triton's default stages
    )


def compile_spec(spec: Spec, arch: int):
    """``triton.compile`` one specialisation for ``sm_<arch>``; returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels are interpreted: run with TRITON_INTERPRET unset or 0")
    signature = dict(spec.signature)
    for name in spec.constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in fn.arg_names}

    # What the JIT infers at run time: 16-byte aligned pointers, and integers divisible by
    # 16: those of spec.divisible (read off a real launch), else those that the launchers
    # keep so (padded k, strides, chunk starts and padded extents, N in every realistic
    # batch). This matters: a mask along the contiguous dimension
    # that is not constant over 16 elements stops vectorisation and software pipelining.
    def divisible(name: str) -> bool:
        if spec.divisible is not None:
            return name in spec.divisible
        return name.startswith("stride") or name in _DIVISIBLE_BY_16

    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or divisible(name)
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": spec.num_warps}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    return triton.compile(source, target=target, options=options)


def cuobjdump_path() -> str | None:
    """The ``cuobjdump`` shipped in Triton's NVIDIA backend, else one on ``PATH``."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local (spill) bytes of a cubin, from ``cuobjdump --dump-resource-usage``."""
    tool = cuobjdump_path()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match:
            usage[key.lower()] = int(match.group(1))
    return usage


_ASYNC_COPY = re.compile(r"^\s*cp\.async\.(?:cg|ca|bulk)(?!\.wait|\.commit)[\w.]*\s", re.M)
_COPY_WAIT = re.compile(r"cp\.async(?:\.bulk)?\.wait_group(?:\.read)?\s+(\d+)")
_MMA_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


def pipelining(ptx: str) -> dict[str, object]:
    """How the loads of a kernel overlap its math, read from its PTX.

    A software-pipelined loop issues asynchronous global->shared copies (``cp.async``, or
    ``cp.async.bulk`` for TMA) and waits with ``wait_group N``, N > 0, so that N copy
    groups stay in flight while the current stage is consumed: ``loads_pipelined``. Waits
    that are all ``wait_group 0`` wait for every copy at once: asynchronous, not pipelined.
    ``wgmma.wait_group N`` > 0 (``mma_waits``) keeps tensor-core work in flight instead.
    ``pipelined`` is the weaker "uses asynchronous copies at all".
    """
    copies = len(_ASYNC_COPY.findall(ptx))
    copy_waits = sorted({int(d) for d in _COPY_WAIT.findall(ptx)})
    return dict(
        async_copies=copies,
        copy_waits=copy_waits,
        mma_waits=sorted({int(d) for d in _MMA_WAIT.findall(ptx)}),
        pipelined=copies > 0,
        loads_pipelined=copies > 0 and max(copy_waits, default=0) > 0,
    )


# Summaries by specialisation and arch: one compile per specialisation and run, however many
# report rows (or launches of benchmarks/kernel_report.py's model) share it.
_SUMMARIES: dict[tuple, dict[str, object]] = {}


def spec_key(spec: Spec, arch: int) -> tuple:
    return (
        spec.fn.__name__,
        tuple(sorted(spec.signature.items())),
        tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
        spec.num_warps,
        spec.num_stages,
        spec.divisible,
        arch,
    )


def report(spec: Spec, arch: int) -> dict[str, object]:
    """Compile ``spec`` for ``sm_<arch>`` (once per run) and summarise the result."""
    key = spec_key(spec, arch)
    if key not in _SUMMARIES:
        _SUMMARIES[key] = _summarise(spec, arch)
    return dict(kernel=spec.name, **_SUMMARIES[key])


def _summarise(spec: Spec, arch: int) -> dict[str, object]:
    kernel = compile_spec(spec, arch)
    ptx = kernel.asm["ptx"]
    usage = resource_usage(kernel.asm["cubin"])
    return dict(
        arch=f"sm_{arch}",
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        shared_bytes=int(kernel.metadata.shared),
        registers=usage.get("reg"),
        stack_bytes=usage.get("stack"),
        local_bytes=usage.get("local"),
        wgmma="wgmma" in ptx,
        mma="mma.sync" in ptx,
        **pipelining(ptx),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--block", type=int, default=None, help="override every tile to BLOCK^3 (4 warps)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    configs = GPU_CONFIGS
    if args.block:
        tile = TileConfig(args.block, args.block, args.block, num_warps=4, num_stages=2)
        configs = dataclasses.replace(
            configs, lse=tile, grad_logits=tile, grad_gemm=tile, fp32_tf32=tile, fp32_ieee=tile
        )
    failed = 0
    for spec in specs(configs):
        if args.filter not in spec.name:
            continue
        for arch in args.arch:
            try:
                row = report(spec, arch)
            except Exception as exc:  # report every failure, not just the first
                failed += 1
                row = dict(kernel=spec.name, arch=f"sm_{arch}", error=f"{type(exc).__name__}: {exc}"[:2000])
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
