"""Independent float64 oracle for the dual partial margin loss (docs/design.md, section 2).

Single process (world size 1). Written directly from the formulas; it shares no code with
``unicom_kernels``. The forward is computed literally (``acos``/``cos`` for ArcFace).
Gradients come from two different mechanisms:

* ``margin_grad="exact"``: plain autograd through the literal forward.
* ``margin_grad="straight_through"``: the analytic logit gradient ``s * (p - onehot)`` (``p``
  being the softmax of the *margined* logits), back-propagated through the cosine only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12
MARGIN_TYPES = ("arcface", "cosface", "none")
MARGIN_GRADS = ("straight_through", "exact")


@dataclass
class OracleResult:
    """Loss and gradients of the oracle, all float64."""

    loss: torch.Tensor  # 0-dim
    grad_embeddings: torch.Tensor  # [B, D]
    grad_prototypes: torch.Tensor  # [C, D]
    cosine: torch.Tensor  # [B, n] clamped cosines against the selected classes
    target_cosine: torch.Tensor  # [B], NaN on ignored rows
    target_class: torch.Tensor  # [B] global class id of the target, -1 on ignored rows


def margined_target_logit(c: torch.Tensor, scale: float, margin: float, margin_type: str) -> torch.Tensor:
    """Target logit ``z_t`` as a function of the target cosine ``c`` (autograd-friendly)."""
    if margin_type == "arcface":
        return scale * torch.cos(torch.acos(c) + margin)
    if margin_type == "cosface":
        return scale * (c - margin)
    if margin_type == "none":
        return scale * c
    raise ValueError(f"unknown margin_type {margin_type!r}")


def oracle(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 32.0,
    margin: float = 0.3,
    margin_type: str = "arcface",
    margin_grad: str = "straight_through",
    class_index: torch.Tensor | None = None,
    dim_index: torch.Tensor | None = None,
    ignore_index: int = -1,
) -> OracleResult:
    """Evaluate loss and gradients in float64 for the given explicit selections.

    ``class_index`` (sorted, distinct) and ``dim_index`` default to all classes / all dims.
    The inputs are upcast to float64 as they are; the oracle never samples.
    """
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"unknown margin_grad {margin_grad!r}")
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"unknown margin_type {margin_type!r}")
    f64 = torch.float64
    x = embeddings.detach().to("cpu", f64).clone().requires_grad_(True)
    w = prototypes.detach().to("cpu", f64).clone().requires_grad_(True)
    labels = labels.detach().to("cpu", torch.int64)
    num_rows, num_classes = x.shape[0], w.shape[0]
    classes = torch.arange(num_classes) if class_index is None else class_index.detach().cpu().long()
    dims = torch.arange(x.shape[1]) if dim_index is None else dim_index.detach().cpu().long()

    # Row i's target column = position of labels[i] inside the selected class list.
    position = {int(k): j for j, k in enumerate(classes.tolist())}
    valid_rows: list[int] = []
    target_cols: list[int] = []
    for i, lab in enumerate(labels.tolist()):
        if lab == ignore_index:
            continue
        if lab not in position:
            raise ValueError(f"label {lab} of row {i} is not among the selected classes")
        valid_rows.append(i)
        target_cols.append(position[lab])
    rows = torch.tensor(valid_rows, dtype=torch.int64)
    cols = torch.tensor(target_cols, dtype=torch.int64)
    count = len(valid_rows)

    # Cosine in the selected subspace (normalisation after the dimension selection).
    xs = x[:, dims]
    ws = w[classes][:, dims]
    x_norm = torch.linalg.vector_norm(xs, dim=1).clamp_min(EPS)
    w_norm = torch.linalg.vector_norm(ws, dim=1).clamp_min(EPS)
    raw = (xs @ ws.T) / (x_norm[:, None] * w_norm[None, :])
    cos = torch.clamp(raw, -1.0, 1.0)

    def loss_from(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Literal forward; returns (mean loss, margined logits of the valid rows)."""
        c_rows = c[rows]
        c_t = c_rows[torch.arange(count), cols]
        z_t = margined_target_logit(c_t, scale, margin, margin_type)
        onehot = torch.zeros_like(c_rows, dtype=torch.bool)
        onehot[torch.arange(count), cols] = True
        z = torch.where(onehot, z_t[:, None], scale * c_rows)
        per_row = torch.logsumexp(z, dim=1) - z_t
        return per_row.sum() / max(count, 1), z

    if margin_grad == "exact":
        loss, _ = loss_from(cos)
        loss.backward()
    else:
        with torch.no_grad():
            loss, z = loss_from(cos.detach())
            probs = torch.softmax(z, dim=1)
            probs[torch.arange(count), cols] -= 1.0
            grad_cos = torch.zeros_like(cos)
            grad_cos[rows] = scale * probs / max(count, 1)
        cos.backward(grad_cos)

    target_cos = torch.full((num_rows,), float("nan"), dtype=f64)
    target_cls = torch.full((num_rows,), -1, dtype=torch.int64)
    if count:
        target_cos[rows] = cos.detach()[rows, cols]
        target_cls[rows] = classes[cols]
    assert x.grad is not None and w.grad is not None
    return OracleResult(
        loss=loss.detach(),
        grad_embeddings=x.grad,
        grad_prototypes=w.grad,
        cosine=cos.detach(),
        target_cosine=target_cos,
        target_class=target_cls,
    )
