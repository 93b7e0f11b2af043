"""Coming from insightface's Partial FC (v2), UNICOM's copy of it, or pytorch-metric-learning.

The numbers quoted in docs/coming-from.md are the maximum absolute differences these tests
measure; each test asserts its own tolerance.

* ``partial_fc_v2`` below is a float64 model, at world size 1, of what insightface's
  ``arcface_torch`` computes with ``PartialFC_V2`` + ``CombinedMarginLoss`` +
  ``DistCrossEntropy``, and (with ``num_feat``) of the feature-dimension sampling that UNICOM's
  ``partial_fc.py`` adds (``sample_num_feat``). It restates their formulas: positives plus
  the top-``num_sample`` of a uniform draw, sorted; ``F.normalize``; the cosine clamped to
  [-1, 1]; the ArcFace margin applied as ``cos(acos(.))`` of every entry without a gradient
  (CosFace: ``c - m`` on the target); a softmax whose target probability is floored at 1e-30
  before the log; the mean over every row of the batch; and the hand-written backward
  ``(p - onehot) / B``. Those packages need CUDA and a process group and are not
  pip-installable, so the model stands in for them.
* pytorch-metric-learning (PML) is the installed package itself (the ``bench`` extra).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss

try:
    from tests.oracle import oracle
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from oracle import oracle  # type: ignore[no-redef]

F64 = torch.float64
BACKENDS = ("reference", "torch")
FLOOR = 1e-30
CAP = -math.log(FLOOR)  # 69.0776: the largest row loss Partial FC can report


# --------------------------------------------------------------------------- the Partial FC v2 model


class _NoGradMargin(torch.autograd.Function):
    """Forward: ``s`` times the margined cosines, as CombinedMarginLoss forms them.
    Backward: ``s`` times the incoming gradient (the margin carries no derivative)."""

    @staticmethod
    def forward(ctx, cos: Tensor, target: Tensor, scale: float, arc: float, cosface: float) -> Tensor:
        rows = torch.nonzero(target >= 0).squeeze(1)
        cols = target[rows]
        if cosface > 0:
            z = cos.clone()
            z[rows, cols] = cos[rows, cols] - cosface
        else:
            theta = torch.acos(cos)
            theta[rows, cols] = theta[rows, cols] + arc
            z = torch.cos(theta)
        ctx.scale = scale
        return z * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None, None, None, None


class _FlooredCrossEntropy(torch.autograd.Function):
    """``-mean_i log(max(p_i,target, 1e-30))`` over all B rows (0 for a row without target);
    backward ``(p - onehot) / B`` whatever the floor did."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        shifted = (logits - logits.max(dim=1, keepdim=True).values).exp()
        p = shifted / shifted.sum(dim=1, keepdim=True)
        rows = torch.nonzero(target >= 0).squeeze(1)
        picked = torch.zeros(logits.shape[0], dtype=logits.dtype)
        picked[rows] = p[rows, target[rows]]
        ctx.save_for_backward(p, target)
        return -picked.clamp_min(FLOOR).log().mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, target = ctx.saved_tensors
        g = p.clone()
        rows = torch.nonzero(target >= 0).squeeze(1)
        g[rows, target[rows]] -= 1.0
        return g / p.shape[0] * grad, None


@dataclass
class PeerResult:
    loss: Tensor
    grad_embeddings: Tensor
    grad_prototypes: Tensor
    class_index: Tensor  # the sampled classes, sorted
    dim_index: Tensor | None  # the sampled dims (UNICOM), in the order drawn


def pfc_sample(labels: Tensor, num_classes: int, sample_rate: float, gen: torch.Generator) -> Tensor:
    """Partial FC's class sampling: the positives plus the top of a uniform draw, sorted."""
    positive = torch.unique(labels[labels >= 0], sorted=True)
    num_sample = int(sample_rate * num_classes)
    if num_sample < positive.numel():
        return positive
    perm = torch.rand(num_classes, generator=gen)
    perm[positive] = 2.0
    return torch.topk(perm, k=num_sample).indices.sort().values


def partial_fc_v2(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    arc: float = 0.5,
    cosface: float = 0.0,
    sample_rate: float = 1.0,
    num_feat: int | None = None,
    gen: torch.Generator | None = None,
    class_index: Tensor | None = None,
    dim_index: Tensor | None = None,
) -> PeerResult:
    """Loss and gradients of Partial FC v2 (UNICOM with ``num_feat``), float64, world size 1.

    ``arc`` is CombinedMarginLoss's ``m2`` (with ``m1 = 1, m3 = 0``); ``cosface`` its ``m3``.
    The sets are drawn from ``gen`` unless ``class_index`` / ``dim_index`` are given.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    x = embeddings.detach().to(F64).clone().requires_grad_(True)
    w = weight.detach().to(F64).clone().requires_grad_(True)
    num_classes, dim = w.shape
    labels = labels.clone().long()
    labels[(labels < 0) | (labels >= num_classes)] = -1  # not this rank's class: -1
    if class_index is None:
        class_index = (
            pfc_sample(labels, num_classes, sample_rate, gen) if sample_rate < 1 else torch.arange(num_classes)
        )
    target = labels.clone()
    valid = target >= 0
    target[valid] = torch.searchsorted(class_index, target[valid])
    ws, xs = w[class_index], x
    if dim_index is None and num_feat is not None and num_feat < dim:
        dim_index = torch.argsort(torch.rand(dim, generator=gen))[:num_feat]
    if dim_index is not None:
        ws, xs = ws.index_select(1, dim_index), xs.index_select(1, dim_index)
    cos = (F.normalize(xs) @ F.normalize(ws).T).clamp(-1, 1)
    loss = _FlooredCrossEntropy.apply(_NoGradMargin.apply(cos, target, scale, arc, cosface), target)
    loss.backward()
    assert x.grad is not None and w.grad is not None
    return PeerResult(loss.detach(), x.grad, w.grad, class_index, dim_index)


# --------------------------------------------------------------------------- inputs


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def leaning_inputs(name: str, rows: int, classes: int, dim: int, lean: float = 0.35) -> tuple[Tensor, Tensor, Tensor]:
    """float64 embeddings that lean towards their class (target cosines ~``lean``), N(0, 0.01) prototypes."""
    g = _gen(name)
    w = 0.01 * torch.randn(classes, dim, generator=g, dtype=F64)
    y = torch.randint(0, classes, (rows,), generator=g)
    x = torch.randn(rows, dim, generator=g, dtype=F64) + F.normalize(w[y], dim=1) * (lean * math.sqrt(dim))
    return x, w, y


def ours(x: Tensor, w: Tensor, y: Tensor, backend: str, **kw: object) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and both gradients of ``dual_partial_margin_loss`` (float64 unless the inputs say otherwise)."""
    xl, wl = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    kw = {"class_sample_rate": 1.0, "dim_sample_rate": 1.0, **kw}
    loss = dual_partial_margin_loss(xl, wl, y, backend=backend, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert xl.grad is not None and wl.grad is not None
    return loss.detach(), xl.grad, wl.grad


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.to(F64) - b.to(F64)).abs().max().item()


def diffs(mine: tuple[Tensor, Tensor, Tensor], peer: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    """Max absolute differences of loss and gradients, plus the largest magnitude of each peer value
    (``*_size``): prototype gradients scale with ``1 / |w|`` and reach ~20 for N(0, 0.01) prototypes."""
    out: dict[str, float] = {}
    for name, a, b in zip(("loss", "grad_emb", "grad_proto"), mine, peer, strict=True):
        out[name] = max_abs(a, b)
        out[f"{name}_size"] = b.abs().max().item()
    return out


def within(d: dict[str, float], tol: float, keys: tuple[str, ...] = ("loss", "grad_emb", "grad_proto")) -> bool:
    """Every difference below ``tol * max(1, size)``: absolute for values up to 1, relative above."""
    return all(d[k] < tol * max(1.0, d[f"{k}_size"]) for k in keys)


# --------------------------------------------------------------------------- Partial FC v2 / UNICOM


MARGINS = {"arcface": {"arc": 0.5, "cosface": 0.0}, "cosface": {"arc": 0.0, "cosface": 0.4}}


def measure_partial_fc(backend: str, margin_type: str, unicom: bool) -> dict[str, float]:
    """Partial FC v2 (or UNICOM, with a random half of the dims) on its own sampled sets against
    ours in straight-through mode on the same sets: s = 64, 500 classes, 20 % sampled."""
    x, w, y = leaning_inputs(f"pfc-{margin_type}-{unicom}", 48, 500, 64)
    peer = partial_fc_v2(
        x, w, y, sample_rate=0.2, num_feat=32 if unicom else None, gen=_gen("draw"), **MARGINS[margin_type]
    )
    assert peer.class_index.numel() == 100 and (peer.dim_index is None) != unicom
    margin = MARGINS[margin_type]["arc" if margin_type == "arcface" else "cosface"]
    mine = ours(
        x, w, y, backend, scale=64.0, margin=margin, margin_type=margin_type,
        class_index=peer.class_index, dim_index=peer.dim_index, margin_grad="straight_through",
    )  # fmt: skip
    assert 0.5 < peer.loss.item() < CAP  # a regime where the floor is not reached
    return diffs(mine, (peer.loss, peer.grad_embeddings, peer.grad_prototypes))


@pytest.mark.parametrize("unicom", [False, True], ids=["partial_fc_v2", "unicom"])
@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_equals_partial_fc_and_unicom(backend: str, margin_type: str, unicom: bool) -> None:
    d = measure_partial_fc(backend, margin_type, unicom)
    assert within(d, 1e-14), d


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_mapped_arguments_equals_unicom_on_the_sets_it_drew(backend: str) -> None:
    """``DualPartialMarginLoss(C, D, scale=64, margin=0.5, class_sample_rate=0.2, num_dims=32)``:
    as many classes as Partial FC samples, and the UNICOM model on the module's own sets agrees."""
    x, w, y = leaning_inputs("module", 48, 500, 64)
    criterion = DualPartialMarginLoss(
        500, 64, scale=64.0, margin=0.5, class_sample_rate=0.2, num_dims=32, backend=backend
    )
    criterion.double()
    with torch.no_grad():
        criterion.weight.copy_(w)
    xl = x.clone().requires_grad_(True)
    loss = criterion(xl, y)
    loss.backward()
    assert criterion.last_class_index.numel() == int(0.2 * 500)
    peer = partial_fc_v2(x, w, y, class_index=criterion.last_class_index, dim_index=criterion.last_dim_index)
    assert criterion.weight.grad is not None and xl.grad is not None
    d = diffs((loss.detach(), xl.grad, criterion.weight.grad), (peer.loss, peer.grad_embeddings, peer.grad_prototypes))
    assert within(d, 1e-14), d


def measure_floor(backend: str) -> dict[str, float]:
    """s = 64 with rows far from their class: Partial FC floors those rows' loss at 69.08; PML does not."""
    g = _gen("floor")
    x, w, y = leaning_inputs("floor", 16, 40, 32)
    far = torch.arange(8)
    x[far] = -3.0 * F.normalize(w[y[far]], dim=1) * math.sqrt(32) + 0.3 * torch.randn(8, 32, generator=g, dtype=F64)
    x[far] += 4.0 * F.normalize(w[(y[far] + 1) % 40], dim=1) * math.sqrt(32)
    per_row = torch.stack([oracle(x[i : i + 1], w, y[i : i + 1], scale=64.0, margin=0.5).loss for i in range(16)])
    assert (per_row[far] > CAP).all() and (per_row[8:] < CAP).all()
    peer = partial_fc_v2(x, w, y)
    mine = ours(x, w, y, backend, scale=64.0, margin=0.5)
    return {
        **diffs(mine, (peer.loss, peer.grad_embeddings, peer.grad_prototypes)),
        "loss_gap": mine[0].item() - peer.loss.item(),
        "expected_gap": (per_row - per_row.clamp_max(CAP)).mean().item(),
        "loss_vs_floored_rows": abs(peer.loss.item() - per_row.clamp_max(CAP).mean().item()),
        # PML uses torch's cross-entropy: no floor (its gradient is the exact one, so compare the loss).
        "pml_vs_ours_exact": abs(
            pml_loss("arcface", x, w, y, scale=64.0, margin=0.5)[0].item()
            - ours(x, w, y, backend, scale=64.0, margin=0.5, margin_grad="exact")[0].item()
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_fc_floors_row_losses_at_69_but_gradients_agree(backend: str) -> None:
    assert CAP == pytest.approx(69.0776, abs=1e-4)
    d = measure_floor(backend)
    assert d["loss_gap"] > 10.0, d  # the loss values differ ...
    assert abs(d["loss_gap"] - d["expected_gap"]) < 1e-12 and d["loss_vs_floored_rows"] < 1e-12, d
    assert d["pml_vs_ours_exact"] < 1e-12, d
    assert within(d, 1e-14, ("grad_emb", "grad_proto")), d  # ... the gradients do not


def measure_ignored_rows(backend: str) -> dict[str, float]:
    """Rows labelled -1: Partial FC counts each as a 69.08 row and sends them a gradient."""
    x, w, y = leaning_inputs("ignored", 20, 60, 32)
    y[[1, 5, 6, 13]] = -1
    keep = y >= 0
    peer = partial_fc_v2(x, w, y, scale=64.0)
    mine = ours(x, w, y, backend, scale=64.0, margin=0.5)
    without = partial_fc_v2(x[keep], w, y[keep], scale=64.0)  # Partial FC on the batch without those rows
    n, b = int(keep.sum()), y.numel()
    return {
        "loss_identity": abs(peer.loss.item() * b - (mine[0].item() * n + (b - n) * CAP)),
        "peer_ignored_row_grad": peer.grad_embeddings[~keep].abs().max().item(),
        "ours_ignored_row_grad": mine[1][~keep].abs().max().item(),
        "kept_rows_rescaled": max_abs(peer.grad_embeddings[keep] * b / n, mine[1][keep]),
        "proto_with_minus_one_rows": max_abs(peer.grad_prototypes * b / n, mine[2]),
        **{
            f"without_rows_{k}": v
            for k, v in diffs(
                (mine[0], mine[1][keep], mine[2]), (without.loss, without.grad_embeddings, without.grad_prototypes)
            ).items()
        },
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_minus_one_is_not_ignored_by_partial_fc(backend: str) -> None:
    d = measure_ignored_rows(backend)
    assert d["loss_identity"] < 1e-11, d  # each -1 row adds 69.08 to a mean over all rows
    assert d["peer_ignored_row_grad"] > 1e-3 and d["ours_ignored_row_grad"] == 0.0, d
    assert d["kept_rows_rescaled"] < 1e-14, d
    assert d["proto_with_minus_one_rows"] > 1e-4, d  # the -1 rows pull on the prototypes too
    keys = ("without_rows_loss", "without_rows_grad_emb", "without_rows_grad_proto")
    assert within(d, 1e-14, keys), d


# --------------------------------------------------------------------------- pytorch-metric-learning


def pml_loss(
    kind: str, x: Tensor, w: Tensor, y: Tensor, *, scale: float, margin: float
) -> tuple[Tensor, Tensor, Tensor, object]:
    """PML's ArcFaceLoss (margin in degrees) or CosFaceLoss with ``W = w.T``: loss, grads, the module."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    num_classes, dim = w.shape
    if kind == "arcface":
        module = losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(margin), scale=scale)
    else:
        module = losses.CosFaceLoss(num_classes, dim, margin=margin, scale=scale)
    assert tuple(module.W.shape) == (dim, num_classes)  # W is [D, C]
    module.W = torch.nn.Parameter(w.detach().T.clone())
    xl = x.detach().clone().requires_grad_(True)
    loss = module(xl, y)
    loss.backward()
    return loss.detach(), xl.grad, module.W.grad.T, module


PML_MARGINS = {"arcface": 0.5, "cosface": 0.35}


def measure_pml(backend: str, kind: str) -> dict[str, float]:
    """PML against ours in exact mode, all classes and dims, s = 64, float64."""
    x, w, y = leaning_inputs(f"pml-{kind}", 32, 80, 48)
    m = PML_MARGINS[kind]
    peer = pml_loss(kind, x, w, y, scale=64.0, margin=m)[:3]
    mine = ours(x, w, y, backend, scale=64.0, margin=m, margin_type=kind, margin_grad="exact")
    straight = ours(x, w, y, backend, scale=64.0, margin=m, margin_type=kind, margin_grad="straight_through")
    d = diffs(mine, peer)
    d["straight_through_grad_emb"] = max_abs(straight[1], peer[1])
    return d


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mode_equals_pml(backend: str, kind: str) -> None:
    d = measure_pml(backend, kind)
    assert within(d, 1e-14), d
    if kind == "arcface":  # the gradient mode matters: straight-through is not PML's gradient
        assert d["straight_through_grad_emb"] > 1e-4, d
    else:  # CosFace's margin is a constant: both modes are PML's gradient
        assert d["straight_through_grad_emb"] < 1e-14, d


def measure_pml_fallback(backend: str) -> dict[str, float]:
    """Rows with theta > pi - m (m = 0.5): PML uses cos(theta) - m sin(m), ours cos(theta + m)."""
    g = _gen("fallback")
    n, c, d, m, s = 12, 30, 24, 0.5, 16.0
    w = 0.01 * torch.randn(c, d, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)
    w_hat = F.normalize(w[y], dim=1)
    noise = torch.randn(n, d, generator=g, dtype=F64)
    u = F.normalize(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat, dim=1)
    cos_t = torch.cat(
        [-0.88 - 0.11 * torch.rand(6, generator=g, dtype=F64), 0.6 * torch.rand(6, generator=g, dtype=F64)]
    )
    x = cos_t[:, None] * w_hat + (1 - cos_t[:, None] ** 2).sqrt() * u
    beyond = torch.acos(cos_t) > math.pi - m
    assert beyond.sum() == 6
    out: dict[str, float] = {}
    for name, rows in (("beyond", beyond), ("within", ~beyond)):
        peer = pml_loss("arcface", x[rows], w, y[rows], scale=s, margin=m)[0]
        mine = ours(x[rows], w, y[rows], backend, scale=s, margin=m, margin_grad="exact")[0]
        # PML's rule written out: the target logit s * (c - m sin m) on every such row.
        cos = oracle(x[rows], w, y[rows], scale=s, margin=m).cosine
        z = s * cos
        z_t = s * (cos_t[rows] - m * math.sin(m)) if name == "beyond" else s * torch.cos(torch.acos(cos_t[rows]) + m)
        z[torch.arange(int(rows.sum())), y[rows]] = z_t
        rule = (torch.logsumexp(z, dim=1) - z_t).mean()
        out[f"{name}_ours_vs_pml"] = abs(mine.item() - peer.item())
        out[f"{name}_pml_vs_rule"] = abs(peer.item() - rule.item())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pml_falls_back_beyond_pi_minus_m(backend: str) -> None:
    d = measure_pml_fallback(backend)
    assert d["beyond_ours_vs_pml"] > 0.5 and d["beyond_pml_vs_rule"] < 1e-12, d
    assert d["within_ours_vs_pml"] < 1e-13 and d["within_pml_vs_rule"] < 1e-12, d


def test_pml_weight_layout_and_degrees() -> None:
    """PML's W is [D, C] (ours: weight [C, D] = W.T) and its ArcFace margin is in degrees."""
    x, w, y = leaning_inputs("degrees", 10, 20, 16)
    in_degrees = pml_loss("arcface", x, w, y, scale=64.0, margin=0.5)[0]  # margin=28.65 degrees
    assert (
        abs(ours(x, w, y, "torch", scale=64.0, margin=0.5, margin_grad="exact")[0].item() - in_degrees.item()) < 1e-13
    )
    # The same number passed in radians to PML is a margin of 0.5 degrees.
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    module = losses.ArcFaceLoss(20, 16, margin=0.5, scale=64.0)
    module.W = torch.nn.Parameter(w.T.clone())
    tiny = module(x, y).item()
    assert (
        abs(ours(x, w, y, "torch", scale=64.0, margin=math.radians(0.5), margin_grad="exact")[0].item() - tiny) < 1e-13
    )
    assert abs(tiny - in_degrees.item()) > 1.0
    # The module from PML's W: weight = W.T; logits() is PML's get_logits() (s * cos).
    criterion = DualPartialMarginLoss(20, 16, scale=64.0, margin=math.radians(0.5), backend="torch").double()
    criterion.weight.data.copy_(module.W.data.T)
    assert max_abs(criterion.logits(x), module.get_logits(x)) < 1e-12
    # Degrees passed to us are refused as a unit slip.
    with pytest.raises(ValueError, match="radians"):
        ours(x, w, y, "torch", margin=28.6)


def measure_fp16(backend: str) -> dict[str, object]:
    """fp16 embeddings: ours returns an fp32 loss (fp32 prototypes, fp32 softmax); PML casts
    its W to fp16 and returns an fp16 loss. Errors against each one's float64 value."""
    x, w, y = leaning_inputs("fp16", 64, 200, 64)
    x16 = x.to(torch.float16)
    exact64 = ours(x16.to(F64), w, y, backend, scale=64.0, margin=0.5, margin_grad="exact")[0]
    mine16 = ours(x16, w.float(), y, backend, scale=64.0, margin=0.5, margin_grad="exact")[0]
    peer16, _, _, module = pml_loss("arcface", x16, w.float(), y, scale=64.0, margin=0.5)
    return {
        "ours_dtype": mine16.dtype,
        "pml_dtype": peer16.dtype,
        "pml_weight_dtype": module.W.dtype,
        "ours_err": abs(mine16.item() - exact64.item()),
        "pml_err": abs(peer16.item() - exact64.item()),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs_give_an_fp32_loss(backend: str) -> None:
    d = measure_fp16(backend)
    assert d["ours_dtype"] == torch.float32 and d["pml_dtype"] == torch.float16, d
    assert d["pml_weight_dtype"] == torch.float16, d  # PML cast its own parameter
    assert d["ours_err"] < 2e-3 and d["pml_err"] > 5e-3, d  # type: ignore[operator]
