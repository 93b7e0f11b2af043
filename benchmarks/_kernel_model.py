"""A model of one training step of the Triton backend on sm_90: occupancy, waves, pipelining, work, time.

Nothing here is measured on a GPU. The launches are the launchers' own: the public loss
(:func:`unicom_kernels.ops.triton_op.margin_softmax_loss`) runs forward and backward on CPU
tensors of the real shape with the GPU configs, and every Triton launch is intercepted
(recorded, not run: ``JITFunction.run`` is replaced), so grids, splits, chunks, tiles and
constexprs come from the launcher code itself. A ``TorchDispatchMode`` records the torch
glue around them (casts, sorts, the autograd seed, ...) and the bytes of every tensor the
step allocates while its Python object lives, for the peak. Each distinct launched specialisation
is compiled for sm_90 (:func:`unicom_kernels.triton.aot.report`) for its registers, shared
memory and pipelining. The time model on top of that uses only the constants below.

The kernels' outputs are never computed, so their values are garbage; that is harmless
because the launchers' control flow depends on shapes only (no host synchronisation).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from unicom_kernels.ops.triton_op import margin_softmax_loss
from unicom_kernels.triton import aot
from unicom_kernels.triton.configs import GPU_CONFIGS, override_configs

# --- sm_90 (H100 SXM / H200) architecture limits.
ARCH = 90
SMS = 132
REGS_PER_SM = 64 * 1024  # 32-bit registers
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024  # the 1 KiB difference is reserved per resident block
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64  # = 2048 threads
MAX_BLOCKS_PER_SM = 32

# --- Throughput assumptions of the time model (not measurements).
PEAK_TENSOR_FLOPS = 989e12  # dense bf16/fp16 tensor-core peak of an H100 SXM / H200
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e
# Integer work off the tensor cores (the forward's row grouping): 64 INT32 lanes per SM at
# 1.75 GHz, all SMs busy only when the grid has a program for each.
INT_OPS_PER_S = SMS * 64 * 1.75e9
LAUNCH_S = 4e-6  # eager launch cost per kernel (Python + driver), paid by every launch
# Fraction of the tensor-core peak a GEMM kernel reaches:
EFF_PIPELINED = 0.70  # wgmma fed by multi-stage cp.async, >= 2 blocks/SM hide each other's epilogue
EFF_PIPELINED_ONE_BLOCK = 0.55  # pipelined, but at 1 block/SM the prologue and epilogue are exposed
EFF_NOT_PIPELINED = 0.35  # every load is waited for before the math that uses it
# The efficiency the goals are stated at: every GEMM kernel at this fraction of the peak
# (times its wave efficiency), the rest as above; a second total beside the ladder's.
EFF_GOAL = 0.65

GOAL_FORWARD_US = 85.0
GOAL_STEP_US = 350.0
GOAL_TRANSIENT_MB = 64.0

# Shape A of benchmarks/bench_triton.py (fp32 inputs, bf16 operands).
SHAPE_A = dict(N=4096, n=12_500, scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through")

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64"}
# aten ops that launch no GPU kernel: allocations and views.
_NO_KERNEL = frozenset(
    "empty empty_like empty_strided new_empty new_empty_strided view _unsafe_view reshape alias as_strided "
    "slice select t transpose permute expand detach unsqueeze squeeze lift_fresh _reshape_alias".split()
)


@dataclass
class Launch:
    """One intercepted Triton launch."""

    phase: str
    fn: triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: dict[str, object]  # every parameter by name, constexprs included
    num_warps: int
    num_stages: int | None

    @property
    def kernel(self) -> str:
        return self.fn.__name__.strip("_").removesuffix("_kernel")


@dataclass
class GlueOp:
    """One torch op that launches a GPU kernel, with the bytes of its tensor operands and results."""

    phase: str
    op: str
    bytes: int


@dataclass
class Recording:
    """Everything one forward + backward launched, in order."""

    phase: str = "forward"
    launches: list[Launch] = field(default_factory=list)
    glue: list[GlueOp] = field(default_factory=list)
    # Bytes of the tensors made so far whose Python objects are alive (a gradient handed to
    # autograd may outlive its object: the peak, during the backward, still counts it).
    live_bytes: int = 0
    peak_bytes: int = 0  # the most that were alive at once
    returned_bytes: int = 0  # what the step returns: the loss and the gradients


def _nbytes(tree: object) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


class _GlueCounter(TorchDispatchMode):
    """Records the aten ops that launch kernels; runs custom ops' bodies under itself."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            # A custom op (unicom_kernels::...): count the ops inside it, not the op itself.
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inputs = [id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # An out-of-place op that hands back its input (x.to(x.dtype)) launched nothing.
        aliased = not name.endswith("_") and all(id(t) in inputs for t in tree_leaves(out))
        if name not in _NO_KERNEL and not aliased:
            self.rec.glue.append(GlueOp(self.rec.phase, name, _nbytes((args, kwargs, out))))
        self._track(out, args, kwargs)
        return out

    def _track(self, out: object, args: object, kwargs: object) -> None:
        """Count the new storages among ``out`` as alive until their tensors are freed (the kernels'
        memory is the launchers' allocations: the recorded launches allocate nothing)."""
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            # Views share a storage; meta tensors (the recorder's copies of launch arguments) have none.
            if not isinstance(t, torch.Tensor) or t._base is not None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self.rec.live_bytes += storage.nbytes()
            self.rec.peak_bytes = max(self.rec.peak_bytes, self.rec.live_bytes)
            weakref.finalize(t, self._free, storage.nbytes())

    def _free(self, nbytes: int) -> None:
        self.rec.live_bytes -= nbytes


@contextlib.contextmanager
def _intercept_launches(rec: Recording) -> Iterator[None]:
    """Replace ``JITFunction.run`` by a recorder: launches are noted, not executed."""
    jit = triton.runtime.jit.JITFunction
    original = jit.run

    def record(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args, strict=False))
        bound.update((k, v) for k, v in kwargs.items() if k in self.arg_names)
        # Keep shapes and dtypes, not the tensors: a held reference to a gradient would make
        # autograd copy it into .grad instead of taking it over, a copy a real step never makes.
        bound = {k: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v for k, v in bound.items()}
        grid = tuple(grid(bound) if callable(grid) else grid)
        rec.launches.append(Launch(rec.phase, self, grid, bound, kwargs.get("num_warps", 4), kwargs.get("num_stages")))

    jit.run = record
    try:
        yield
    finally:
        jit.run = original


def record_step(N: int, n: int, k: int, **loss_kwargs: object) -> Recording:
    """Forward + backward of the triton loss at ``[N, k]`` x ``[n, k]`` (fp32 inputs, bf16 compute), recorded."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, k, generator=gen).requires_grad_()
    w = torch.randn(n, k, generator=gen).requires_grad_()
    target = torch.randint(0, n, (N,), generator=gen)
    rec = Recording()
    with override_configs(GPU_CONFIGS), _intercept_launches(rec), _GlueCounter(rec):
        loss = margin_softmax_loss(x, w, target, compute_dtype=torch.bfloat16, **loss_kwargs)
        rec.phase = "backward"
        loss.backward()
    rec.returned_bytes = _nbytes((loss, x.grad, w.grad))
    return rec


def spec_of(launch: Launch) -> aot.Spec:
    """The compile specialisation of a launch, typed as the JIT would type its arguments."""
    constexpr = {p.name for p in launch.fn.params if p.is_constexpr}
    signature, constexprs, divisible = {}, {}, []
    for name in launch.fn.arg_names:
        value = launch.args[name]
        if name in constexpr:
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR[value.dtype]
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:  # the JIT's divisibility specialisation
                divisible.append(name)
        else:
            signature[name] = "fp32"
    flags = [f"{k}={int(v)}" for k, v in constexprs.items() if isinstance(v, bool) and k != "UPCAST"]
    first_ptr = next(v for v in signature.values() if v.startswith("*"))
    name = f"{launch.kernel}[{','.join([first_ptr[1:], *flags])}]"
    return aot.Spec(name, launch.fn, signature, constexprs, launch.num_warps, launch.num_stages, tuple(divisible))


def blocks_per_sm(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and the resource that limits them."""
    regs_per_warp = math.ceil(registers * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    smem_blocks = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK) if shared_bytes <= SMEM_PER_BLOCK else 0
    limits = {
        "regs": REGS_PER_SM // regs_per_warp // num_warps,
        "smem": smem_blocks,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def _itemsize(launch: Launch, name: str) -> int:
    return launch.args[name].element_size()


def gemm_flops(launch: Launch) -> int:
    """Useful tensor-core FLOPs of a launch: ``2 * rows * classes * K`` per GEMM pass it does (0: no GEMM)."""
    a = launch.args
    if launch.kernel == "lse_partial":
        return 2 * a["N"] * a["n"] * a["K"]
    if launch.kernel == "softmax_grad":
        return 2 * a["N"] * min(a["chunk_pad"], a["n"] - a["col0"]) * a["K"]
    if launch.kernel == "grad_gemm":  # G @ W and G^T @ X
        return 2 * 2 * a["N"] * a["chunk"] * a["K"]
    return 0


def int_ops(launch: Launch) -> int:
    """Integer operations off the tensor cores that can dominate a launch: the combine kernel's
    row grouping compares every pair of rows (an int64 compare and an add, about 3 ops)."""
    a = launch.args
    if launch.kernel == "lse_combine" and a["GROUP"]:
        return 3 * a["N"] * a["N"]
    return 0


def ideal_bytes(launch: Launch) -> int:
    """Ideal minimum HBM traffic of a launch: every operand element read once, every result written once."""
    a, kernel = launch.args, launch.kernel
    N, n = a["N"], a.get("n", 0)
    if kernel == "unit_rows":  # raw rows in, unit rows (padded) and norms out
        out = a["K_OUT"] * _itemsize(launch, "xu_ptr") + 4
        return N * (a["K"] * _itemsize(launch, "x_ptr") + out) + n * (a["K"] * _itemsize(launch, "w_ptr") + out)
    if kernel == "unit_rows_grad":
        # Per operand: fp32 sums and raw rows in, raw-dtype gradient out, norms; the gathered
        # prototype row of each embedding row, each scattered embedding row once, and the
        # targets, groups and coefficients.
        x_rows = N * a["K"] * (4 + 2 * _itemsize(launch, "x_ptr") + _itemsize(launch, "wu_ptr")) + 4 * N
        w_rows = n * a["K"] * (4 + 2 * _itemsize(launch, "w_ptr")) + 4 * n
        return x_rows + w_rows + N * a["K"] * _itemsize(launch, "xu_ptr") + 28 * N
    if kernel == "lse_partial":
        splits = launch.grid[1]
        return (N + a["n"]) * a["K"] * _itemsize(launch, "x_ptr") + 12 * N + 8 * splits * N
    if kernel == "lse_combine":  # partials; x rows, gathered w rows; target in, 7 per-row results out
        return 8 * a["S"] * N + 2 * N * a["K"] * _itemsize(launch, "x_ptr") + 8 * N + 36 * N
    if kernel == "loss_finalize":
        return 12 * N
    if kernel == "softmax_grad":
        cols = min(a["chunk_pad"], a["n"] - a["col0"])
        operands = (N + cols) * a["K"] * _itemsize(launch, "x_ptr")
        return operands + 16 * N + N * a["chunk_pad"] * _itemsize(launch, "g_ptr")
    g = N * a["chunk_pad"] * _itemsize(launch, "g_ptr")
    if kernel == "grad_gemm":  # G read once (from L2 by the second GEMM), both operands, both results
        grad_x = N * a["K"] * 4 * (1 if a["FIRST"] else 2)  # fp32 accumulator: read back unless first
        operands = (N * _itemsize(launch, "x_ptr") + a["chunk"] * _itemsize(launch, "w_ptr")) * a["K"]
        return g + operands + grad_x + a["chunk"] * a["K"] * 4
    raise ValueError(f"no traffic model for kernel {kernel!r}")


def efficiency(loads_pipelined: bool, blocks: int) -> float:
    """Assumed fraction of the tensor-core peak (see the EFF_* constants)."""
    if not loads_pipelined:
        return EFF_NOT_PIPELINED
    return EFF_PIPELINED if blocks >= 2 else EFF_PIPELINED_ONE_BLOCK


def _seconds(flops: int, hbm: int, ints: float, launches: int, wave_eff: float, eff: float | None) -> float:
    """Modelled time: tensor-core work at ``eff`` (None: no tensor-core work) over the wave
    efficiency, the minimum traffic, or the integer work ``ints`` (seconds), whichever is
    longest, plus the launches."""
    math_s = flops / (PEAK_TENSOR_FLOPS * eff) / wave_eff if eff is not None else 0.0
    return max(math_s, hbm / HBM_BYTES_PER_S, ints) + LAUNCH_S * launches


def kernel_rows(rec: Recording, arch: int = ARCH) -> list[dict[str, object]]:
    """One row per (phase, specialisation, grid): resources, occupancy, waves, work and modelled time."""
    groups: dict[tuple, list[Launch]] = {}
    for launch in rec.launches:
        spec = spec_of(launch)
        groups.setdefault((launch.phase, spec.name, aot.spec_key(spec, arch), launch.grid), []).append(launch)
    rows = []
    for (phase, name, _, grid), launches in groups.items():
        first = launches[0]
        compiled = aot.report(spec_of(first), arch)
        blocks, limiter = blocks_per_sm(compiled["registers"], compiled["shared_bytes"], first.num_warps)
        programs = math.prod(grid)
        waves = programs / (SMS * blocks)
        wave_eff = programs / (math.ceil(waves) * SMS * blocks)
        flops = sum(gemm_flops(x) for x in launches)
        hbm = sum(ideal_bytes(x) for x in launches)
        tensor_core = compiled["wgmma"] or compiled["mma"]
        eff = efficiency(compiled["loads_pipelined"], blocks) if tensor_core else None
        ints = sum(int_ops(x) for x in launches) / (INT_OPS_PER_S * min(1.0, programs / SMS))
        seconds = _seconds(flops, hbm, ints, len(launches), wave_eff, eff)
        rows.append(
            dict(
                phase=phase,
                kernel=name,
                launches=len(launches),
                grid=list(grid),
                programs=programs,
                num_warps=first.num_warps,
                num_stages=compiled["num_stages"],
                registers=compiled["registers"],
                shared_bytes=compiled["shared_bytes"],
                local_bytes=compiled["local_bytes"],
                blocks_per_sm=blocks,
                occupancy_limit=limiter,
                waves=waves,
                wave_efficiency=wave_eff,
                wgmma=compiled["wgmma"],
                async_copies=compiled["async_copies"],
                copy_waits=compiled["copy_waits"],
                mma_waits=compiled["mma_waits"],
                pipelined=compiled["loads_pipelined"],
                flops=flops,
                hbm_bytes_ideal=hbm,
                tc_efficiency=eff,
                model_us=seconds * 1e6,
                int_us=ints * 1e6,
                model_us_at_goal_eff=_seconds(
                    flops, hbm, ints, len(launches), wave_eff, EFF_GOAL if tensor_core else None
                )
                * 1e6,
            )
        )
    return rows


def glue_rows(rec: Recording) -> list[dict[str, object]]:
    """One row per (phase, aten op): kernels launched, bytes moved and modelled time."""
    groups: dict[tuple[str, str], list[GlueOp]] = {}
    for op in rec.glue:
        groups.setdefault((op.phase, op.op), []).append(op)
    return [
        dict(
            phase=phase,
            op=op,
            launches=len(ops),
            bytes=sum(o.bytes for o in ops),
            model_us=(sum(o.bytes for o in ops) / HBM_BYTES_PER_S + LAUNCH_S * len(ops)) * 1e6,
        )
        for (phase, op), ops in groups.items()
    ]


def totals(kernels: list[dict], glue: list[dict]) -> dict[str, object]:
    """Launch counts and modelled times of the forward and of forward + backward, beside the goals."""
    out: dict[str, object] = {}
    for phase in ("forward", "backward"):
        out[f"{phase}_triton_launches"] = sum(r["launches"] for r in kernels if r["phase"] == phase)
        out[f"{phase}_torch_launches"] = sum(r["launches"] for r in glue if r["phase"] == phase)
        out[f"{phase}_model_us"] = sum(r["model_us"] for r in kernels + glue if r["phase"] == phase)
        out[f"{phase}_model_us_at_goal_eff"] = sum(
            r.get("model_us_at_goal_eff", r["model_us"]) for r in kernels + glue if r["phase"] == phase
        )
    out["step_model_us"] = out["forward_model_us"] + out["backward_model_us"]
    out["step_model_us_at_goal_eff"] = out["forward_model_us_at_goal_eff"] + out["backward_model_us_at_goal_eff"]
    out["goal_eff"] = EFF_GOAL
    # The floor under that: the GEMM passes alone at EFF_GOAL with perfect waves, no launch.
    out["step_gemm_floor_us"] = sum(r["flops"] for r in kernels) / (PEAK_TENSOR_FLOPS * EFF_GOAL) * 1e6
    launches = {
        phase: out[f"{phase}_triton_launches"] + out[f"{phase}_torch_launches"] for phase in ("forward", "backward")
    }
    out["forward_launch_us"] = launches["forward"] * LAUNCH_S * 1e6
    out["step_launch_us"] = (launches["forward"] + launches["backward"]) * LAUNCH_S * 1e6
    out["goal_forward_us"] = GOAL_FORWARD_US
    out["goal_step_us"] = GOAL_STEP_US
    return out


def design_bounds(N: int, n: int, k: int) -> dict[str, object]:
    """Lower bounds, in this model, on any design that meets the memory goal without atomics.

    The forward needs one GEMM pass and a second launch to merge its class splits (one
    program per row block over every class would leave most SMs idle; a grid-wide merge in
    the same launch needs atomics). The backward needs the softmax ``p``: ``N x n`` values,
    at least 2 bytes each (8 bits would be coarser than eager bf16). Where that exceeds the
    memory goal it cannot be kept from the forward, so it is recomputed (one more GEMM pass)
    chunk by chunk: two launches per chunk (the gradient GEMMs read a chunk that the other
    programs of the recomputing launch write; two alternating workspaces would let one launch
    recompute a chunk while reducing the previous one, but each is then half as large, so
    that is no fewer launches). Autograd adds one launch, the seed gradient.

    Returns the forward and step floors (GEMMs at ``EFF_GOAL`` with perfect waves, plus
    ``LAUNCH_S`` per launch, nothing else), the launch counts behind them, and the step
    floor of the one route these bounds leave open: keeping from the forward the share of
    ``p`` that fits the memory goal, which saves that share of the recompute pass.
    """
    gemm_pass_us = 2 * N * n * k / (PEAK_TENSOR_FLOPS * EFF_GOAL) * 1e6
    softmax_bytes = 2 * N * n
    goal_bytes = GOAL_TRANSIENT_MB * 1e6
    forward_launches = 2
    backward_launches = 2 * math.ceil(softmax_bytes / goal_bytes) + 1
    launches_us = (forward_launches + backward_launches) * LAUNCH_S * 1e6
    kept = min(1.0, goal_bytes / softmax_bytes)
    recompute = softmax_bytes > goal_bytes
    return dict(
        softmax_mb=softmax_bytes / 1e6,
        bound_recomputes=recompute,
        bound_forward_launches=forward_launches,
        bound_backward_launches=backward_launches,
        bound_forward_us=gemm_pass_us + forward_launches * LAUNCH_S * 1e6,
        bound_step_us=(4 if recompute else 3) * gemm_pass_us + launches_us,
        bound_kept_share=kept,
        bound_step_keeping_us=(4 - kept) * gemm_pass_us + launches_us,
    )


def model(k: int, shape: dict[str, object] = SHAPE_A) -> dict[str, object]:
    """The whole model at ``shape`` with ``k`` kept dims: kernel rows, glue rows and totals."""
    shape = dict(shape)
    N, n = shape.pop("N"), shape.pop("n")
    rec = record_step(N, n, k, **shape)
    kernels, glue = kernel_rows(rec), glue_rows(rec)
    out = totals(kernels, glue)
    # The launchers' own allocations, counted on the CPU (a GPU's caching allocator adds its
    # rounding): the peak of forward + backward beyond the inputs and what the step returns.
    out["transient_mb"] = (rec.peak_bytes - rec.returned_bytes) / 1e6
    out["goal_transient_mb"] = GOAL_TRANSIENT_MB
    out.update(design_bounds(N, n, k))
    return dict(K=k, kernels=kernels, glue=glue, totals=out)
