"""Memory-bounded PyTorch backend: row chunks against all sampled classes.

A chunk of ``rows`` embeddings meets *all* ``n`` local classes at once, so its
log-sum-exp is exact immediately. When the weights of ``dL/dlse`` and ``dL/dz_t`` are
known before the pass (single process: ``1/count`` and ``-1/count``), the gradients are
formed in the same pass (the Liger-Kernel schedule): three GEMM passes in all (logits,
``G @ W``, ``G^T @ X``). Across ranks the weights depend on the global log-sum-exp, so
:func:`lse_and_target` runs one pass forward and recomputes in the backward (four).

The largest intermediate is one ``[rows, n]`` fp32 block with ``rows * n <=
CHUNK_ELEMENTS`` (at least one row), plus a boolean mask of it.

GEMM operands are rounded to ``compute_dtype`` (the precision contract: bf16/fp16
inputs give bf16/fp16 products) and multiplied in the accumulation dtype, so the
logits are never stored in half precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..margin import target_logit

# 32 MiB of fp32 logits per chunk: at n = 50k that is 167 rows, enough for the GEMMs
# to run near full speed (below ~100 rows they slow down by a third on CPU).
CHUNK_ELEMENTS = 1 << 23


class _Problem:
    """Operands rounded to the compute dtype, and each row's margined target logit."""

    def __init__(self, xn: Tensor, wn: Tensor, target: Tensor, scale: float, margin_args: dict, compute_dtype):
        acc = xn.dtype
        self.x = xn.to(compute_dtype).to(acc)
        self.w = wn.to(compute_dtype).to(acc)
        self.scale = scale
        self.has_target = target >= 0
        self.col = target.clamp_min(0)
        raw_t = (self.x * self.w[self.col]).sum(1)
        self.z_t, dz_dc = target_logit(raw_t.clamp(-1.0, 1.0), scale=scale, **margin_args)
        self.dz_dc = dz_dc * (raw_t.abs() < 1.0)  # torch.clamp's gradient mask: zero at +-1

    def run(self, lse_weight: Tensor | None = None, target_weight: Tensor | None = None):
        """One pass over row chunks: per-row log-sum-exp and, given the weights, the gradients.

        With ``L = sum_i lse_weight_i * lse_i + target_weight_i * z_t_i``, returns
        ``(lse [N], dL/dx [N, k], dL/dw [n, k])``; the gradients are ``None`` without weights.
        """
        x, w, scale = self.x, self.w, self.scale
        num_rows, num_cols = x.shape[0], w.shape[0]
        lse = torch.empty(num_rows, dtype=x.dtype, device=x.device)
        want_grad = lse_weight is not None
        grad_x = torch.zeros_like(x) if want_grad else None
        grad_w = torch.zeros_like(w) if want_grad else None
        step = max(1, CHUNK_ELEMENTS // num_cols)
        for r0 in range(0, num_rows, step):
            rows = slice(r0, min(r0 + step, num_rows))
            has_t = self.has_target[rows]
            ar = torch.arange(rows.stop - r0, device=x.device)[has_t]
            c = self.col[rows][has_t]
            logits = x[rows] @ w.T
            outside = (logits >= 1.0).logical_or_(logits <= -1.0)  # clamp's gradient mask; no fp32 temp
            logits.clamp_(-1.0, 1.0).mul_(scale)
            logits[ar, c] = self.z_t[rows][has_t]
            # Log-sum-exp by hand so the exponentials are computed once and reused as p.
            row_max = logits.amax(dim=1)
            g = logits.sub_(row_max.unsqueeze(1)).exp_()
            sum_exp = g.sum(dim=1)
            lse[rows] = row_max + sum_exp.log()
            if not want_grad:
                continue
            # dL/dz_ij = a_i p_ij (+ b_i on the target); dz/dcos = scale off-target, dz_dc on it.
            a = lse_weight[rows]
            p_t = g[ar, c] / sum_exp[has_t]
            g.mul_((scale * a / sum_exp).unsqueeze(1)).masked_fill_(outside, 0.0)
            g[ar, c] = (a[has_t] * p_t + target_weight[rows][has_t]) * self.dz_dc[rows][has_t]
            grad_x[rows] = g @ w
            grad_w.addmm_(g.T, x[rows])
        return lse, grad_x, grad_w


def _wants_grad(ctx) -> bool:
    return ctx.needs_input_grad[0] or ctx.needs_input_grad[1]


class _ChunkedMarginSoftmax(torch.autograd.Function):
    """Single-process loss with the gradients formed in the forward (scaled by grad_output later)."""

    @staticmethod
    def forward(ctx, xn, wn, target, scale, margin_args, compute_dtype):
        problem = _Problem(xn, wn, target, scale, margin_args, compute_dtype)
        valid = problem.has_target
        count = valid.sum().clamp_min(1).to(xn.dtype)
        row_weight = valid.to(xn.dtype) / count
        if _wants_grad(ctx):
            lse, grad_x, grad_w = problem.run(row_weight, -row_weight)
        else:
            (lse, _, _), grad_x, grad_w = problem.run(), None, None
        ctx.save_for_backward(grad_x, grad_w)
        return torch.where(valid, lse - problem.z_t, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None, None, None


class _ChunkedLseAndTarget(torch.autograd.Function):
    """Per-row local log-sum-exp and target logit; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, xn, wn, target, scale, margin_args, compute_dtype):
        problem = _Problem(xn, wn, target, scale, margin_args, compute_dtype)
        lse, _, _ = problem.run()
        ctx.problem = problem
        return lse, torch.where(problem.has_target, problem.z_t, 0.0)

    @staticmethod
    def backward(ctx, grad_lse, grad_z_t):
        problem = ctx.problem
        del ctx.problem
        _, grad_x, grad_w = problem.run(grad_lse, torch.where(problem.has_target, grad_z_t, 0.0))
        return grad_x, grad_w, None, None, None, None


def _margin_args(margin: float, margin_type: str, margin_grad: str) -> dict:
    return {"margin": margin, "margin_type": margin_type, "margin_grad": margin_grad}


def margin_softmax_loss(
    xn: Tensor,
    wn: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> Tensor:
    """Single-process loss (contract in :mod:`unicom_kernels.ops`), in bounded memory.

    Peak extra memory: the ``[N, k]`` and ``[n, k]`` gradients plus one ``[rows, n]``
    logit block, ``rows = max(1, CHUNK_ELEMENTS // n)``.
    """
    args = _margin_args(margin, margin_type, margin_grad)
    return _ChunkedMarginSoftmax.apply(xn, wn, target, scale, args, compute_dtype)


def lse_and_target(
    xn: Tensor,
    wn: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Local statistics for a loss over classes split across ranks (contract in :mod:`unicom_kernels.ops`)."""
    args = _margin_args(margin, margin_type, margin_grad)
    return _ChunkedLseAndTarget.apply(xn, wn, target, scale, args, compute_dtype)
