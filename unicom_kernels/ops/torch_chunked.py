"""Memory-bounded PyTorch backend: row chunks with the gradient formed in the forward.

A chunk of ``rows`` embeddings meets *all* ``n`` sampled prototypes at once, so its
log-sum-exp is exact immediately and ``dL/dlogits`` can be turned into gradients in
the same pass (the Liger-Kernel schedule): three GEMM passes in all (logits,
``G @ W``, ``G^T @ X``) instead of the four a class-chunked forward plus recompute
would need. The largest intermediate is one ``[rows, n]`` fp32 block with
``rows * n <= CHUNK_ELEMENTS`` (at least one row), plus a boolean mask of it. The gradients are kept from the
forward and scaled by ``grad_output`` in the backward, which is valid because the
loss is a scalar.

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


class _ChunkedMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        xn: Tensor,
        wn: Tensor,
        target: Tensor,
        scale: float,
        margin: float,
        margin_type: str,
        margin_grad: str,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        acc = xn.dtype
        x = xn.to(compute_dtype).to(acc)
        w = wn.to(compute_dtype).to(acc)
        num_rows, num_cols = x.shape[0], w.shape[0]
        valid = target >= 0
        col = target.clamp_min(0)
        count = valid.sum().clamp_min(1).to(acc)

        raw_t = (x * w[col]).sum(1)
        z_t, dz_dc = target_logit(
            raw_t.clamp(-1.0, 1.0), scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad
        )
        dz_dc = dz_dc * (raw_t.abs() <= 1.0)  # torch.clamp's gradient mask
        # Per-row weight of the mean; ignored rows contribute nothing.
        row_weight = valid.to(acc) / count

        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if want_grad else None
        grad_w = torch.zeros_like(w) if want_grad else None
        per_row = torch.empty(num_rows, dtype=acc, device=x.device)

        step = max(1, CHUNK_ELEMENTS // max(num_cols, 1))
        for r0 in range(0, num_rows, step):
            rows = slice(r0, min(r0 + step, num_rows))
            ar = torch.arange(rows.stop - r0, device=x.device)
            c = col[rows]
            logits = x[rows] @ w.T
            outside = (logits > 1.0).logical_or_(logits < -1.0)  # no fp32 temporary
            logits.clamp_(-1.0, 1.0).mul_(scale)
            logits[ar, c] = z_t[rows]
            # Log-sum-exp by hand so the exponentials are computed once and reused as p.
            row_max = logits.amax(dim=1)
            g = logits.sub_(row_max.unsqueeze(1)).exp_()
            sum_exp = g.sum(dim=1)
            per_row[rows] = row_max + sum_exp.log() - z_t[rows]
            if not want_grad:
                continue
            # dL/dz = softmax(z) - onehot(t); dz/dcos = scale off-target, dz_dc on it.
            p_t = g[ar, c] / sum_exp
            g.mul_((scale * row_weight[rows] / sum_exp).unsqueeze(1)).masked_fill_(outside, 0.0)
            g[ar, c] = (p_t - 1.0) * dz_dc[rows] * row_weight[rows]
            grad_x[rows] = g @ w
            grad_w.addmm_(g.T, x[rows])

        ctx.save_for_backward(grad_x, grad_w)
        return torch.where(valid, per_row, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None, None, None, None, None


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
    """Same contract as :func:`unicom_kernels.reference.margin_softmax_loss`, in bounded memory.

    Args:
        xn: ``[N, k]`` L2-normalised embeddings (fp32 or fp64).
        wn: ``[n, k]`` L2-normalised sampled prototypes, same dtype as ``xn``.
        target: ``[N]`` int64 column of each row's class in ``wn``; ``-1`` ignores the row.
        compute_dtype: dtype the GEMM operands are rounded to.

    Returns:
        0-dim loss in ``xn.dtype``. Peak extra memory: ``[N, k] + [n, k]`` gradients plus
        one ``[rows, n]`` logit block, ``rows = max(1, CHUNK_ELEMENTS // n)``.
    """
    return _ChunkedMarginSoftmax.apply(xn, wn, target, scale, margin, margin_type, margin_grad, compute_dtype)
