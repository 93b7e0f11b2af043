"""Memory-bounded PyTorch backend: row chunks against all sampled classes.

A chunk of ``rows`` embeddings meets *all* ``n`` local classes at once, so its
log-sum-exp is exact immediately. When the weights of ``dL/dlse`` and ``dL/dz_t`` are
known before the pass (single process: ``1/count`` and ``-1/count``), the gradients are
formed in the same pass (the Liger-Kernel schedule): three GEMM passes in all (logits,
``G @ W``, ``G^T @ X``). Across ranks the weights depend on the global log-sum-exp, so
:func:`lse_and_target` runs one pass forward and recomputes in the backward (four).

The largest intermediate is one ``[rows, n]`` fp32 block with ``rows * n <=
CHUNK_ELEMENTS`` (at least one row; under torch.compile all rows, see
:func:`_row_chunks`). Six elementwise passes over it per chunk (eight in
fp32/fp64, where the prototypes' inverse norms scale the block instead of a normalised
copy of the prototypes being made).

One deliberate difference from the autograd of ``clamp``: off the target, the gradient
is passed even where rounding pushed a cosine to or past +-1 (the target keeps the
clamp's mask, which is what keeps its exact ArcFace slope finite). Such an entry belongs
to nearly parallel vectors, whose true cosine lies inside (-1, 1), so the unmasked
gradient is the exact one; after the normalisation's Jacobian it is at most
``s * p * sqrt(1 - c^2)``, i.e. tiny, and it saves the mask's three passes.

The L2 normalisation is fused in: rows are normalised once without autograd, and the
backward applies its Jacobian ``(g - u <u, g>) / max(|v|, eps)`` in place on the
gradient buffers (autograd's version costs several ``[n, k]`` temporaries and ~15 % of
the time at ``n`` = 25k on CPU).

GEMM operands are rounded to ``compute_dtype`` (the precision contract: bf16/fp16
inputs give bf16/fp16 products) and multiplied in the accumulation dtype, so the
logits are never stored in half precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..margin import target_logit
from . import accumulation_dtype, mean_over_rows, once_differentiable, unit_rows, unit_rows_grad_

# 32 MiB of fp32 logits per chunk: at n = 50k that is 167 rows, enough for the GEMMs
# to run near full speed (below ~100 rows they slow down by a third on CPU).
CHUNK_ELEMENTS = 1 << 23
_NAME = "backend='torch'"


class _Unit:
    """Rows of ``v`` normalised to unit length (``v / max(|v|, eps)``) as GEMM operands, no autograd.

    ``operand`` holds the rows the GEMMs multiply, rounded to the compute dtype. When no
    rounding is needed (fp32/fp64 compute) and ``lazy``, it is ``v`` itself and
    ``col_scale = 1 / max(|v|, eps)`` is applied to the products instead: that saves a
    normalised ``[n, k]`` copy (a third of the backend's memory at n = 50k).
    """

    def __init__(self, v: Tensor, compute_dtype: torch.dtype, lazy: bool = False):
        acc = accumulation_dtype(compute_dtype)
        self.dtype = v.dtype
        v, self.inv_norm, self.projects = unit_rows(v, compute_dtype)
        if lazy and compute_dtype == acc:
            self.unit, self.operand, self.col_scale = None, v, self.inv_norm
        else:
            self.unit = v * self.inv_norm.unsqueeze(1)
            self.operand, self.col_scale = self.unit.to(compute_dtype).to(acc), None

    def grad_in_place(self, grad: Tensor) -> Tensor:
        """``dL/dv`` from the gradient accumulated for ``operand`` (overwritten).

        That is ``g = dL/du``, giving ``(g - u <u, g>) / max(|v|, eps)``; or, with
        ``col_scale``, ``h = g / max(|v|, eps)`` already, giving ``h - v <v, h> / |v|^2``.
        """
        if self.col_scale is None:
            unit_rows_grad_(grad, self.unit, self.inv_norm, self.projects)
        else:
            v = self.operand
            dots = torch.bmm(v.unsqueeze(1), grad.unsqueeze(2)).view(-1) * self.inv_norm.square() * self.projects
            grad.addcmul_(v, dots.unsqueeze(1), value=-1.0)
        return grad.to(self.dtype)


class _Problem:
    """Normalised operands rounded to the compute dtype, and each row's margined target logit."""

    def __init__(self, x: Tensor, w: Tensor, target: Tensor, scale: float, margin_args: dict, compute_dtype):
        self.x_unit, self.w_unit = _Unit(x, compute_dtype), _Unit(w, compute_dtype, lazy=True)
        self.x, self.w = self.x_unit.operand, self.w_unit.operand
        self.scale = scale
        self.has_target = target >= 0
        self.col = target.clamp_min(0)
        raw_t = (self.x * self.w[self.col]).sum(1)
        if self.w_unit.col_scale is not None:
            raw_t *= self.w_unit.col_scale[self.col]
        self.z_t, dz_dc = target_logit(raw_t.clamp(-1.0, 1.0), scale=scale, **margin_args)
        self.dz_dc = dz_dc * (raw_t.abs() < 1.0)  # torch.clamp's gradient mask: zero at +-1

    def run(self, lse_weight: Tensor | None = None, target_weight: Tensor | None = None):
        """One pass over row chunks: per-row log-sum-exp and, given the weights, the gradients.

        With ``L = sum_i lse_weight_i * lse_i + target_weight_i * z_t_i``, returns
        ``(lse [N], dL/dx [N, k], dL/dw [n, k])`` (gradients of the raw, unnormalised inputs,
        in their dtypes); the gradients are ``None`` without weights.
        """
        x, w, scale, col_scale = self.x, self.w, self.scale, self.w_unit.col_scale
        num_rows, num_cols = x.shape[0], w.shape[0]
        lse = torch.empty(num_rows, dtype=x.dtype, device=x.device)
        want_grad = lse_weight is not None
        grad_x = torch.zeros_like(x) if want_grad else None
        grad_w = torch.zeros_like(w) if want_grad else None
        for rows in _row_chunks(num_rows, num_cols):
            # Fixed-shape target updates (gather, then scatter back with rows without a target
            # keeping their entry): a boolean mask would read its count back from the device.
            has_t, c = self.has_target[rows], self.col[rows].unsqueeze(1)
            # s * cos straight from the GEMM (the scale folded into the small operand), clamped.
            logits = (x[rows] * scale) @ w.T
            if col_scale is not None:
                logits.mul_(col_scale)
            logits.clamp_(-scale, scale)
            logits.scatter_(1, c, torch.where(has_t, self.z_t[rows], logits.gather(1, c).squeeze(1)).unsqueeze(1))
            # Log-sum-exp by hand so the exponentials are computed once and reused as p.
            row_max = logits.amax(dim=1)
            g = logits.sub_(row_max.unsqueeze(1)).exp_()
            sum_exp = g.sum(dim=1)
            lse[rows] = row_max + sum_exp.log()
            if not want_grad:
                continue
            # dL/dz_ij = a_i p_ij (+ b_i on the target); dz/dcos = scale off-target, dz_dc on it.
            a = lse_weight[rows]
            exp_t, row_factor = g.gather(1, c).squeeze(1), scale * a / sum_exp
            g.mul_(row_factor.unsqueeze(1))
            on_target = (a * (exp_t / sum_exp) + target_weight[rows]) * self.dz_dc[rows]
            # Rows without a target write back exp_t * row_factor, the value g.mul_ just left there.
            g.scatter_(1, c, torch.where(has_t, on_target, exp_t * row_factor).unsqueeze(1))
            if col_scale is not None:  # G diag(1/|w|): then G @ w = G @ w_unit, and G^T @ x = h
                g.mul_(col_scale)
            grad_x[rows] = g @ w
            grad_w.addmm_(g.T, x[rows])
        if want_grad:
            grad_x, grad_w = self.x_unit.grad_in_place(grad_x), self.w_unit.grad_in_place(grad_w)
        return lse, grad_x, grad_w


def _row_chunks(num_rows, num_cols) -> list[slice]:
    """Row slices of ``[rows, num_cols]`` blocks, ``rows * num_cols <= CHUNK_ELEMENTS`` (at least one row).

    Under torch.compile one slice of every row: a loop over chunks would fix the batch size
    and the class count (unknown while tracing when it counts distinct positives) in the
    graph, so the graph would be traced again for every batch size, or not at all.
    """
    if torch.compiler.is_compiling():
        return [slice(0, num_rows)]
    step = max(1, CHUNK_ELEMENTS // num_cols)
    return [slice(r0, min(r0 + step, num_rows)) for r0 in range(0, num_rows, step)]


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on ``device`` costs no wait for an accelerator (and
    no data-dependent branch in a graph being compiled)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


class _ChunkedMarginSoftmax(torch.autograd.Function):
    """Single-process loss with the gradients formed in the forward (scaled by grad_output later)."""

    @staticmethod
    def forward(ctx, x, w, target, scale, margin_args, compute_dtype):
        problem = _Problem(x, w, target, scale, margin_args, compute_dtype)
        valid = problem.has_target
        acc = problem.x.dtype
        count = valid.sum().clamp_min(1).to(acc)
        row_weight = valid.to(acc) / count
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            lse, grad_x, grad_w = problem.run(row_weight, -row_weight)
        else:
            (lse, _, _), grad_x, grad_w = problem.run(), None, None
        ctx.save_for_backward(grad_x, grad_w)
        ctx.handed_over = False
        return mean_over_rows(lse - problem.z_t, valid)

    @staticmethod
    def backward(ctx, grad_out):
        try:
            grad_x, grad_w = ctx.saved_tensors
        except RuntimeError as exc:  # a buffer handed over by an earlier backward was edited since
            if "modified by an inplace operation" not in str(exc):
                raise
            raise RuntimeError(
                f"{_NAME} returned its gradient buffers themselves from the first backward through this "
                "graph, and they were modified in place since; a later backward through the retained graph "
                "needs them unchanged: clone the first gradients before editing them, or use backend='reference'"
            ) from exc
        # The loss is usually the graph's root (grad_out == 1): hand the buffers over instead
        # of copying them, which halves the backward's peak; only once, so that a second
        # backward through a retained graph returns new tensors, not the same ones again.
        # Reading grad_out is free on the CPU; elsewhere it would wait for the device, so
        # there the product is always formed.
        if ctx.handed_over or not _host_reads_are_free(grad_out.device) or grad_out.item() != 1.0:
            grad_x, grad_w = grad_x * grad_out, grad_w * grad_out
        else:
            ctx.handed_over = True
        return *once_differentiable(_NAME, grad_x, grad_w), None, None, None, None


class _ChunkedLseAndTarget(torch.autograd.Function):
    """Per-row local log-sum-exp and target logit; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, x, w, target, scale, margin_args, compute_dtype):
        problem = _Problem(x, w, target, scale, margin_args, compute_dtype)
        lse, _, _ = problem.run()
        ctx.problem = problem
        return lse, torch.where(problem.has_target, problem.z_t, 0.0)

    @staticmethod
    def backward(ctx, grad_lse, grad_z_t):
        problem, ctx.problem = ctx.problem, None  # freed by the first backward, not with the graph
        if problem is None:
            raise RuntimeError(
                f"{_NAME} frees the operands of the per-row statistics in the first backward through the "
                "graph; a second backward through a retained graph needs backend='reference'"
            )
        _, grad_x, grad_w = problem.run(grad_lse, torch.where(problem.has_target, grad_z_t, 0.0))
        return *once_differentiable(_NAME, grad_x, grad_w), None, None, None, None


def _margin_args(margin: float, margin_type: str, margin_grad: str) -> dict:
    return {"margin": margin, "margin_type": margin_type, "margin_grad": margin_grad}


def margin_softmax_loss(
    x: Tensor,
    w: Tensor,
    target: Tensor,
    *,
    scale: float,
    margin: float,
    margin_type: str,
    margin_grad: str,
    compute_dtype: torch.dtype,
) -> Tensor:
    """Single-process loss (contract in :mod:`unicom_kernels.ops`), in bounded memory.

    Peak extra memory: the gradients (``[N, k]``, ``[n, k]``), the normalised embeddings,
    for fp16/bf16 the normalised, rounded prototypes (``[n, k]``), and one ``[rows, n]``
    logit block, ``rows = max(1, CHUNK_ELEMENTS // n)``.
    """
    args = _margin_args(margin, margin_type, margin_grad)
    return _ChunkedMarginSoftmax.apply(x, w, target, scale, args, compute_dtype)


def lse_and_target(
    x: Tensor,
    w: Tensor,
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
    return _ChunkedLseAndTarget.apply(x, w, target, scale, args, compute_dtype)
