"""Row-sparse optimizer updates of the prototypes: gather, update and scatter in one kernel.

A program owns ``BLOCK_R`` entries of the step's row ``index`` and walks their ``D`` columns in
``BLOCK_D`` chunks: it loads the parameter row, the compact gradient row and the state rows,
updates them in registers and stores them back in place. The rows of one index are distinct
(the class sampler's top-k, :class:`~unicom_kernels.row_grad.RowGrad`'s sorted union), so no
two programs write the same row: no atomics, and the result does not depend on the order in
which programs run. A row's step counter is read once and written once, by its own program.
Parameters, gradient and state are fp32 with unit stride along ``D``; row offsets are int64
(``C x D`` may exceed 2^31 elements).

:func:`adamw_rows_` and :func:`sgd_rows_` take the same arguments as the torch updates in
:mod:`unicom_kernels.optim`; :func:`specs` lists the kernels for ahead-of-time compilation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .aot import Spec
from .configs import INTERPRETING

# Memory-bound: 8 x 128 fp32 tiles (4 KiB per operand) keep 4 warps busy with 16-byte loads;
# small tiles under the interpreter exercise the ragged edges of tiny test shapes.
BLOCK_R, BLOCK_D, NUM_WARPS = (16, 32, 4) if INTERPRETING else (8, 128, 4)


@triton.jit
def _one_minus_pow(t, log_beta):
    """``1 - beta^t`` in fp32 from ``ln(beta)`` (``-inf`` for ``beta = 0``), ``t >= 1``.

    ``beta^t`` is close to 1 early on (``0.999^1``): ``1 - exp(a)`` would cancel, so this uses
    Kahan's ``expm1(a) = (exp(a) - 1) * a / ln(exp(a))``, accurate to a few ulps. Below ``a = -30``
    the answer is 1 in fp32 (``e^-30 < 1e-13``); clamping there keeps ``exp(a)`` out of the
    subnormals, where ``ln`` of its few bits (or a GPU's flush to zero) would spoil the quotient.
    """
    a = tl.maximum(t * log_beta, -30.0)
    u = tl.exp(a)
    safe = tl.where(u == 1.0, 0.5, u)  # keeps the unused branch free of 0 / 0
    return -tl.where(u == 1.0, a, tl.div_rn((u - 1.0) * a, tl.log(safe)))


@triton.jit
def _lerp(start, end, weight):
    """``torch.lerp``'s two-sided form: from ``end`` when ``weight >= 0.5``, so that ``weight = 1``
    (``beta1 = 0``) gives ``end`` exactly instead of ``start + (end - start)``, which cancels."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _adamw_rows_kernel(
    param_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    step_ptr,
    index_ptr,
    grad_ptr,
    n,
    D,
    stride_p,
    stride_g,
    lr,
    beta1,
    beta2,
    log_beta1,
    log_beta2,
    eps,
    decay,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    entries = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = entries < n
    rows = tl.load(index_ptr + entries, mask=row_ok, other=0)
    t = tl.load(step_ptr + rows, mask=row_ok, other=0) + 1
    tf = t.to(tl.float32)
    step_size = tl.div_rn(lr, _one_minus_pow(tf, log_beta1))[:, None]
    bc2_sqrt = tl.sqrt_rn(_one_minus_pow(tf, log_beta2))[:, None]
    p_off = rows.to(tl.int64)[:, None] * stride_p
    g_off = entries.to(tl.int64)[:, None] * stride_g
    cols = tl.arange(0, BLOCK_D)[None, :]
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (cols < D - d0)
        p = tl.load(param_ptr + p_off + d0 + cols, mask=ok, other=0.0)
        g = tl.load(grad_ptr + g_off + d0 + cols, mask=ok, other=0.0)
        m = tl.load(exp_avg_ptr + p_off + d0 + cols, mask=ok, other=0.0)
        v = tl.load(exp_avg_sq_ptr + p_off + d0 + cols, mask=ok, other=0.0)
        p = p * decay  # decoupled weight decay, applied before the Adam step as in torch.optim.AdamW
        m = _lerp(m, g, 1.0 - beta1)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(param_ptr + p_off + d0 + cols, p, mask=ok)
        tl.store(exp_avg_ptr + p_off + d0 + cols, m, mask=ok)
        tl.store(exp_avg_sq_ptr + p_off + d0 + cols, v, mask=ok)
    tl.store(step_ptr + rows, t, mask=row_ok)


@triton.jit
def _sgd_rows_kernel(
    param_ptr,
    buf_ptr,
    index_ptr,
    grad_ptr,
    n,
    D,
    stride_p,
    stride_g,
    lr,
    momentum,
    weight_decay,
    MOMENTUM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    entries = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = entries < n
    rows = tl.load(index_ptr + entries, mask=row_ok, other=0)
    p_off = rows.to(tl.int64)[:, None] * stride_p
    g_off = entries.to(tl.int64)[:, None] * stride_g
    cols = tl.arange(0, BLOCK_D)[None, :]
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (cols < D - d0)
        p = tl.load(param_ptr + p_off + d0 + cols, mask=ok, other=0.0)
        g = tl.load(grad_ptr + g_off + d0 + cols, mask=ok, other=0.0)
        g = g + weight_decay * p  # L2 on the gradient, as torch.optim.SGD
        if MOMENTUM:
            # A zero buffer makes the first update of a row equal torch's clone of the gradient.
            g = tl.load(buf_ptr + p_off + d0 + cols, mask=ok, other=0.0) * momentum + g
            tl.store(buf_ptr + p_off + d0 + cols, g, mask=ok)
        tl.store(param_ptr + p_off + d0 + cols, p - lr * g, mask=ok)


def _check(param: Tensor, index: Tensor, grad: Tensor, *state: Tensor) -> None:
    for name, t in (("param", param), ("grad", grad), *(("state", s) for s in state)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be fp32 with unit stride along D, got {t.dtype} strides {t.stride()}")
    for s in state:
        if s.shape != param.shape or s.stride() != param.stride():
            raise ValueError(f"optimizer state {tuple(s.shape)} must match the parameter's shape and strides")
    if index.dtype != torch.int64 or grad.shape != (index.numel(), param.shape[1]):
        raise ValueError(f"grad {tuple(grad.shape)} must be [len(index), D] for an int64 index of {index.numel()}")


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def adamw_rows_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    index: Tensor,
    grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Lazy AdamW on rows ``index [n]`` of ``param [C, D]``, in place; ``grad [n, D]`` is their
    gradient, ``step [C]`` int64 the per-row update counts (advanced for these rows only)."""
    _check(param, index, grad, exp_avg, exp_avg_sq)
    n = index.numel()
    if n == 0:
        return
    _adamw_rows_kernel[(triton.cdiv(n, BLOCK_R),)](
        param,
        exp_avg,
        exp_avg_sq,
        step,
        index,
        grad.contiguous(),
        n,
        param.shape[1],
        param.stride(0),
        param.shape[1],
        lr,
        beta1,
        beta2,
        _log(beta1),
        _log(beta2),
        eps,
        1.0 - lr * weight_decay,
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )


def sgd_rows_(
    param: Tensor,
    momentum_buffer: Tensor | None,
    index: Tensor,
    grad: Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """SGD with momentum on rows ``index [n]`` of ``param [C, D]``, in place; ``grad [n, D]`` is
    their gradient; ``momentum_buffer [C, D]`` (``None`` when ``momentum == 0``)."""
    state = () if momentum_buffer is None else (momentum_buffer,)
    _check(param, index, grad, *state)
    n = index.numel()
    if n == 0:
        return
    _sgd_rows_kernel[(triton.cdiv(n, BLOCK_R),)](
        param,
        param if momentum_buffer is None else momentum_buffer,  # not read without MOMENTUM
        index,
        grad.contiguous(),
        n,
        param.shape[1],
        param.stride(0),
        param.shape[1],
        lr,
        momentum,
        weight_decay,
        MOMENTUM=momentum_buffer is not None,
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )


def specs() -> Iterator[Spec]:
    """The specialisations a GPU launch compiles, for :func:`~.aot.compile_spec` (``D`` and the
    row strides divisible by 16, as for ``D = 512``)."""
    f32p, i64p, i32, f32 = "*fp32", "*i64", "i32", "fp32"
    rows = dict(n=i32, D=i32, stride_p=i32, stride_g=i32)
    blocks = dict(BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    divisible = ("D", "stride_p", "stride_g")
    adam = dict(
        param_ptr=f32p, exp_avg_ptr=f32p, exp_avg_sq_ptr=f32p, step_ptr=i64p, index_ptr=i64p, grad_ptr=f32p, **rows
    )
    adam.update({k: f32 for k in ("lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps", "decay")})
    yield Spec("adamw_rows", _adamw_rows_kernel, adam, blocks, NUM_WARPS, None, divisible)
    sgd = dict(param_ptr=f32p, buf_ptr=f32p, index_ptr=i64p, grad_ptr=f32p, **rows, lr=f32, momentum=f32)
    sgd["weight_decay"] = f32
    for with_momentum in (True, False):
        constexprs = dict(MOMENTUM=with_momentum, **blocks)
        yield Spec(
            f"sgd_rows[momentum={int(with_momentum)}]", _sgd_rows_kernel, sgd, constexprs, NUM_WARPS, None, divisible
        )
