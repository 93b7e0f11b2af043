"""Agreement of the library's backends with the independent float64 oracle (tests/oracle.py).

* float64: every backend matches the oracle tightly (loss, embedding and prototype gradients).
* fp32 / fp16 / bf16: the "three-way test" -- a backend's error against the float64 oracle may
  be at most twice the error of the eager ``reference`` backend in the same dtype, plus a small
  atol; the reference itself must stay within a loose absolute bound.
* gradcheck of ``margin_grad="exact"``, gradient-mode sanity, and sampled (non-explicit) runs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor

from unicom_kernels import dual_partial_margin_loss

try:
    from tests.oracle import MARGIN_GRADS, MARGIN_TYPES, OracleResult, oracle
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from oracle import MARGIN_GRADS, MARGIN_TYPES, OracleResult, oracle  # type: ignore[no-redef]

F64 = torch.float64
BACKENDS = ("reference", "torch")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One set of float64 inputs plus the explicit selections and hyper-parameters."""

    name: str
    embeddings: Tensor  # [B, D] float64
    prototypes: Tensor  # [C, D] float64
    labels: Tensor  # [B] int64
    class_index: Tensor | None = None
    dim_index: Tensor | None = None
    scale: float = 32.0
    margin: float = 0.3
    ignore_index: int = -1
    rtol64: float = 1e-9  # relative tolerance of the float64 comparison
    # Rows (nearly) parallel to their target: gradients are tiny differences of large terms and
    # the ArcFace logit is ill-conditioned. Compared in fp32 only, with 300x looser tolerances.
    ill_conditioned: bool = False

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments shared by the oracle and the library."""
        return {
            "scale": self.scale,
            "margin": self.margin,
            "class_index": self.class_index,
            "dim_index": self.dim_index,
            "ignore_index": self.ignore_index,
        }


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * std


def _class_selection(g: torch.Generator, labels: Tensor, num_classes: int, negatives: int, ignore_index: int) -> Tensor:
    """Sorted positives plus ``negatives`` distinct random other classes."""
    pos = torch.unique(labels[labels != ignore_index])
    others = torch.tensor([c for c in torch.randperm(num_classes, generator=g).tolist() if c not in set(pos.tolist())])
    return torch.sort(torch.cat([pos, others[:negatives]])).values


def _dim_selection(g: torch.Generator, dim: int, k: int) -> Tensor:
    return torch.sort(torch.randperm(dim, generator=g)[:k]).values


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _random(name: str, n: int, c: int, d: int, **kw: object) -> Case:
    g = _gen(name)
    emb = _randn(g, n, d)
    proto = _randn(g, c, d, std=0.01)
    labels = torch.randint(0, c, (n,), generator=g)
    return Case(name, emb, proto, labels, **kw)  # type: ignore[arg-type]


def case_basic() -> Case:
    return _random("basic", 16, 50, 32)


def case_awkward_selected() -> Case:
    g = _gen("awkward_selected")
    n, c, d = 13, 211, 45
    base = _random("awkward_selected", n, c, d, margin=0.5)
    return replace(
        base,
        class_index=_class_selection(g, base.labels, c, 60, -1),
        dim_index=_dim_selection(g, d, 29),
    )


def case_ignored() -> Case:
    g = _gen("ignored")
    n, c, d = 19, 70, 24
    base = _random("ignored", n, c, d)
    labels = base.labels.clone()
    labels[torch.randperm(n, generator=g)[:6]] = -1
    return replace(
        base,
        labels=labels,
        class_index=_class_selection(g, labels, c, 25, -1),
        dim_index=_dim_selection(g, d, 17),
    )


def case_ignore_index_custom() -> Case:
    base = _random("ignore_index_custom", 9, 30, 16)
    labels = base.labels.clone()
    labels[[0, 4, 8]] = -100
    return replace(base, labels=labels, ignore_index=-100)


def case_duplicates() -> Case:
    g = _gen("duplicates")
    n, c, d = 24, 40, 16
    base = _random("duplicates", n, c, d)
    labels = torch.tensor([3, 7, 7, 11])[torch.randint(0, 4, (n,), generator=g)]
    return replace(base, labels=labels, class_index=_class_selection(g, labels, c, 10, -1))


def case_unsorted_selection() -> Case:
    """Explicit class and dim selections given in random (unsorted) order."""
    g = _gen("unsorted_selection")
    base = case_awkward_selected()
    assert base.class_index is not None and base.dim_index is not None
    cls = base.class_index[torch.randperm(base.class_index.numel(), generator=g)]
    dims = base.dim_index[torch.randperm(base.dim_index.numel(), generator=g)]
    return replace(base, name="unsorted_selection", class_index=cls, dim_index=dims)


def case_single_row() -> Case:
    return _random("single_row", 1, 17, 8)


def case_peaked_target() -> Case:
    """Each row is almost parallel to its target prototype (target cosine ~ 1 - 5e-7)."""
    g = _gen("peaked_target")
    base = _random("peaked_target", 12, 64, 32)
    emb = 3.0 * _unit(base.prototypes[base.labels]) + _randn(g, 12, 32, std=1e-3 / 32**0.5 * 3)
    return replace(base, embeddings=emb, ill_conditioned=True)


def case_peaked_other() -> Case:
    """Each row is almost parallel to a non-target prototype."""
    g = _gen("peaked_other")
    base = _random("peaked_other", 12, 64, 32)
    other = (base.labels + 1 + torch.randint(0, 62, (12,), generator=g)) % 64
    emb = 2.0 * _unit(base.prototypes[other]) + _randn(g, 12, 32, std=1e-3 / 32**0.5 * 2)
    return replace(base, embeddings=emb)


def case_exact_pm1() -> Case:
    """Embeddings equal to a prototype or its negative: cosines of +-1 up to rounding."""
    base = _random("exact_pm1", 10, 20, 16, margin=0.5)
    emb = base.embeddings.clone()
    w = base.prototypes
    emb[0:3] = w[base.labels[0:3]]  # equal to the target prototype
    emb[3:6] = -w[base.labels[3:6]]  # negative of the target prototype
    emb[6:8] = 7.0 * w[(base.labels[6:8] + 1) % 20]  # parallel to a non-target prototype
    emb[8:10] = -w[(base.labels[8:10] + 3) % 20]  # anti-parallel to a non-target prototype
    # The forward is ill-conditioned at |c| = 1 (d acos/dc is infinite): last-bit differences
    # of c move the ArcFace logit by ~ s * sin(m) * 3e-8.
    return replace(base, embeddings=emb, rtol64=1e-6, ill_conditioned=True)


def case_theta_plus_m_gt_pi() -> Case:
    """Target cosines in [-0.999, -0.85] with m = 0.5, so that acos(c) + m > pi."""
    g = _gen("theta_plus_m_gt_pi")
    n, c, d = 14, 30, 24
    base = _random("theta_plus_m_gt_pi", n, c, d, margin=0.5)
    w_hat = _unit(base.prototypes[base.labels])
    noise = _randn(g, n, d)
    u = _unit(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat)
    cos_t = -0.85 - 0.149 * torch.rand(n, generator=g, dtype=F64)
    radius = 0.5 + torch.rand(n, 1, generator=g, dtype=F64)
    emb = radius * (cos_t[:, None] * w_hat + (1 - cos_t[:, None] ** 2).sqrt() * u)
    return replace(base, embeddings=emb)


def _all_negative(name: str, scale: float) -> Case:
    """All prototypes share a direction v and the rows point to -v: every cosine ~ -0.86."""
    g = _gen(name)
    n, c, d = 11, 48, 32
    v = _unit(_randn(g, d))
    proto = 0.1 * v + _randn(g, c, d, std=0.01)
    emb = -(1.0 + torch.rand(n, 1, generator=g, dtype=F64)) * v + _randn(g, n, d, std=0.1)
    labels = torch.randint(0, c, (n,), generator=g)
    return Case(name, emb, proto, labels, scale=scale, margin=0.5)


def case_all_negative_s64() -> Case:
    return _all_negative("all_negative_s64", 64.0)


def case_all_negative_s128() -> Case:
    return _all_negative("all_negative_s128", 128.0)


def case_large_scale() -> Case:
    g = _gen("large_scale")
    base = _random("large_scale", 20, 100, 64, scale=128.0, margin=0.5)
    return replace(base, dim_index=_dim_selection(g, 64, 33))


def case_all_ignored() -> Case:
    base = _random("all_ignored", 5, 12, 8)
    return replace(base, labels=torch.full((5,), -1, dtype=torch.int64))


CASES: dict[str, Callable[[], Case]] = {
    f.__name__.removeprefix("case_"): f
    for f in (
        case_basic,
        case_awkward_selected,
        case_ignored,
        case_ignore_index_custom,
        case_duplicates,
        case_unsorted_selection,
        case_single_row,
        case_peaked_target,
        case_peaked_other,
        case_exact_pm1,
        case_theta_plus_m_gt_pi,
        case_all_negative_s64,
        case_all_negative_s128,
        case_large_scale,
        case_all_ignored,
    )
}
LOW_PRECISION_CASES = (
    "basic",
    "awkward_selected",
    "ignored",
    "duplicates",
    "peaked_target",
    "peaked_other",
    "exact_pm1",
    "theta_plus_m_gt_pi",
    "all_negative_s128",
    "large_scale",
    "all_ignored",
)


# --------------------------------------------------------------------------- helpers


@dataclass
class Result:
    loss: Tensor
    grad_embeddings: Tensor
    grad_prototypes: Tensor


def run_library(
    case: Case,
    backend: str,
    margin_type: str,
    margin_grad: str,
    emb_dtype: torch.dtype = F64,
    proto_dtype: torch.dtype = F64,
) -> Result:
    """Forward + backward through the library; checks output dtypes and finiteness."""
    emb = case.embeddings.to(emb_dtype, copy=True).requires_grad_(True)
    proto = case.prototypes.to(proto_dtype, copy=True).requires_grad_(True)
    loss = dual_partial_margin_loss(
        emb,
        proto,
        case.labels,
        margin_type=margin_type,
        margin_grad=margin_grad,
        class_sample_rate=1.0,
        dim_sample_rate=1.0,
        backend=backend,
        **case.kwargs(),  # type: ignore[arg-type]
    )
    want = F64 if F64 in (emb_dtype, proto_dtype) else torch.float32
    assert loss.dim() == 0, f"loss shape {tuple(loss.shape)}"
    assert loss.dtype == want, f"loss dtype {loss.dtype}, expected {want}"
    loss.backward()
    assert emb.grad is not None and proto.grad is not None, "no gradient reached the inputs"
    assert emb.grad.dtype == emb_dtype and proto.grad.dtype == proto_dtype
    for name, t in (("loss", loss), ("grad_emb", emb.grad), ("grad_proto", proto.grad)):
        assert torch.isfinite(t).all(), f"{backend}: non-finite {name}"
    return Result(loss.detach().to(F64), emb.grad.to(F64), proto.grad.to(F64))


def run_oracle(
    case: Case,
    margin_type: str,
    margin_grad: str,
    emb_dtype: torch.dtype = F64,
    proto_dtype: torch.dtype = F64,
) -> OracleResult:
    """The oracle on exactly the values the library sees (rounded to the input dtypes)."""
    return oracle(
        case.embeddings.to(emb_dtype),
        case.prototypes.to(proto_dtype),
        case.labels,
        margin_type=margin_type,
        margin_grad=margin_grad,
        **case.kwargs(),  # type: ignore[arg-type]
    )


def exact_masks(
    case: Case, ref: OracleResult, margin_type: str, margin_grad: str, limit: float
) -> tuple[Tensor, Tensor]:
    """Rows / prototype rows whose exact gradient is well defined (|c_target| <= limit).

    The exact ArcFace derivative is unbounded at |c| = 1, so rows with a target cosine
    beyond ``limit`` (and the prototypes they target) are left out of the comparison.
    """
    rows = torch.ones(case.labels.shape[0], dtype=torch.bool)
    protos = torch.ones(case.prototypes.shape[0], dtype=torch.bool)
    if margin_grad == "exact" and margin_type == "arcface":
        bad = ref.target_cosine.abs() > limit  # NaN (ignored rows) compares False
        rows &= ~bad
        protos[ref.target_class[bad]] = False
    return rows, protos


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (absolute when ``want`` is tiny)."""
    if want.numel() == 0:
        return 0.0
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def errors(got: Result, want: OracleResult, rows: Tensor, protos: Tensor) -> dict[str, float]:
    """Normalised errors of loss and both gradients (on the masked rows)."""
    return {
        "loss": abs(got.loss.item() - want.loss.item()) / max(abs(want.loss.item()), 1.0),
        "grad_emb": rel_err(got.grad_embeddings[rows], want.grad_embeddings[rows]),
        "grad_proto": rel_err(got.grad_prototypes[protos], want.grad_prototypes[protos]),
    }


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3e}" for k, v in d.items())


# --------------------------------------------------------------------------- oracle self-checks


def test_oracle_hand_computed() -> None:
    """x = e0, w0 = e0, w1 = e1: cosines (1, 0); loss = log(exp(s cos m) + 1) - s cos m."""
    x = torch.tensor([[2.0, 0.0]], dtype=F64)
    w = torch.tensor([[0.5, 0.0], [0.0, 3.0]], dtype=F64)
    s, m = 4.0, 0.5
    for margin_type, z_t in (
        ("arcface", s * math.cos(m)),
        ("cosface", s * (1 - m)),
        ("none", s),
    ):
        got = oracle(x, w, torch.tensor([0]), scale=s, margin=m, margin_type=margin_type)
        want = math.log(math.exp(z_t) + 1.0) - z_t
        assert abs(got.loss.item() - want) < 1e-14


@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_oracle_exact_mode_finite_differences(margin_type: str) -> None:
    """The oracle's own exact-mode gradients agree with central finite differences."""
    g = _gen("oracle_fd")
    inputs = [_randn(g, 5, 6), _randn(g, 7, 6, std=0.3)]
    labels = torch.tensor([0, 3, -1, 3, 6])
    kw = {
        "scale": 3.0,
        "margin": 0.4,
        "margin_type": margin_type,
        "dim_index": torch.tensor([0, 2, 3, 5]),
        "class_index": torch.tensor([0, 1, 3, 6]),
    }
    res = oracle(*inputs, labels, margin_grad="exact", **kw)  # type: ignore[arg-type]
    step = 1e-6
    for which, grad in enumerate((res.grad_embeddings, res.grad_prototypes)):
        fd = torch.zeros_like(grad)
        for idx in range(grad.numel()):
            losses = []
            for sign in (1.0, -1.0):
                moved = [t.clone() for t in inputs]
                moved[which].view(-1)[idx] += sign * step
                losses.append(oracle(*moved, labels, **kw).loss)  # type: ignore[arg-type]
            fd.view(-1)[idx] = (losses[0] - losses[1]) / (2 * step)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_oracle_modes_coincide_without_margin_derivative() -> None:
    """Straight-through (analytic) equals exact (autograd) when dz_t/dc_t = s."""
    case = case_awkward_selected()
    for margin_type in ("none", "cosface"):
        a = run_oracle(case, margin_type, "exact")
        b = run_oracle(case, margin_type, "straight_through")
        torch.testing.assert_close(a.grad_embeddings, b.grad_embeddings, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.grad_prototypes, b.grad_prototypes, rtol=1e-12, atol=1e-14)
    a = run_oracle(case, "arcface", "exact")
    b = run_oracle(case, "arcface", "straight_through")
    assert not torch.allclose(a.grad_embeddings, b.grad_embeddings)


def test_oracle_straight_through_matches_detach_trick() -> None:
    """The analytic straight-through gradient equals the detach-trick autograd gradient."""
    case = case_theta_plus_m_gt_pi()
    res = run_oracle(case, "arcface", "straight_through")
    x = case.embeddings.clone().requires_grad_(True)
    w = case.prototypes.clone().requires_grad_(True)
    cos = torch.clamp(
        (x @ w.T) / (x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :]),
        -1.0,
        1.0,
    )
    onehot = torch.nn.functional.one_hot(case.labels, cos.shape[1]).bool()
    with torch.no_grad():
        bump = case.scale * torch.cos(torch.acos(cos) + case.margin) - case.scale * cos
    z = case.scale * cos + torch.where(onehot, bump, 0.0)
    loss = torch.nn.functional.cross_entropy(z, case.labels)
    loss.backward()
    torch.testing.assert_close(loss.detach(), res.loss, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(x.grad, res.grad_embeddings, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w.grad, res.grad_prototypes, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- float64 agreement


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("margin_grad", MARGIN_GRADS)
@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_oracle(backend: str, margin_type: str, margin_grad: str, case_name: str) -> None:
    case = CASES[case_name]()
    want = run_oracle(case, margin_type, margin_grad)
    got = run_library(case, backend, margin_type, margin_grad)
    rows, protos = exact_masks(case, want, margin_type, margin_grad, 1 - 1e-9)
    err = errors(got, want, rows, protos)
    assert max(err.values()) <= case.rtol64, f"{backend} vs oracle: {_fmt(err)}"
    if not (case.labels != case.ignore_index).any():
        assert got.loss.item() == 0.0
        assert not got.grad_embeddings.any() and not got.grad_prototypes.any()
    # Gradients exist only on selected classes and selected dims.
    row = torch.zeros(case.prototypes.shape[0], dtype=torch.bool)
    row[slice(None) if case.class_index is None else case.class_index] = True
    col = torch.zeros(case.prototypes.shape[1], dtype=torch.bool)
    col[slice(None) if case.dim_index is None else case.dim_index] = True
    keep = row[:, None] & col[None, :]
    assert not got.grad_prototypes[~keep].any(), "prototype gradient outside the selection"
    assert not got.grad_embeddings[:, ~col].any(), "embedding gradient outside dim_index"


# --------------------------------------------------------------------------- low precision


LOW_DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "fp16_fp16": (torch.float16, torch.float16),
    "bf16_bf16": (torch.bfloat16, torch.bfloat16),
}
# (atol of the three-way rule, loose bound on the reference's own error, exact-mode |c| limit)
LOW_TOLERANCES = {
    torch.float32: (1e-5, 3e-5, 1 - 1e-3),
    torch.float16: (1e-3, 5e-2, 0.9),
    torch.bfloat16: (1e-3, 1.5e-1, 0.9),
}
# triton runs fp32/fp16/bf16 only (interpreted here); its float64 ValueError is tested in test_bad_input.
THREE_WAY_BACKENDS = (*(b for b in BACKENDS if b != "reference"), "triton")
LOW_PRECISION_PARAMS = [
    (dtypes, name)
    for dtypes in LOW_DTYPES
    for name in LOW_PRECISION_CASES
    if dtypes == "fp32" or not CASES[name]().ill_conditioned
]


@pytest.mark.parametrize(("dtypes", "case_name"), LOW_PRECISION_PARAMS)
@pytest.mark.parametrize("margin_grad", MARGIN_GRADS)
@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
@pytest.mark.parametrize("backend", THREE_WAY_BACKENDS)
def test_low_precision_three_way(backend: str, margin_type: str, margin_grad: str, dtypes: str, case_name: str) -> None:
    """Error vs the float64 oracle <= 2 x the eager reference's error in that dtype + atol."""
    emb_dtype, proto_dtype = LOW_DTYPES[dtypes]
    low = emb_dtype if proto_dtype == torch.float32 else proto_dtype
    atol, ref_bound, limit = LOW_TOLERANCES[low]
    case = CASES[case_name]()
    if case.ill_conditioned:  # e.g. the ArcFace logit moves by s*sin(m)*3.5e-4 one fp32 ulp below c = 1
        atol, ref_bound = 300 * atol, 300 * ref_bound
    want = run_oracle(case, margin_type, margin_grad, emb_dtype, proto_dtype)
    rows, protos = exact_masks(case, want, margin_type, margin_grad, limit)
    ref = run_library(case, "reference", margin_type, margin_grad, emb_dtype, proto_dtype)
    ref_err = errors(ref, want, rows, protos)
    assert max(ref_err.values()) <= ref_bound, f"reference vs oracle ({dtypes}): {_fmt(ref_err)}"
    got = run_library(case, backend, margin_type, margin_grad, emb_dtype, proto_dtype)
    err = errors(got, want, rows, protos)
    for key, value in err.items():
        assert value <= 2 * ref_err[key] + atol, (
            f"{backend} {key} ({dtypes}): error {value:.3e} > 2 x reference {ref_err[key]:.3e} + {atol:g}"
            f" ({backend}: {_fmt(err)}; reference: {_fmt(ref_err)})"
        )


# --------------------------------------------------------------------------- gradcheck / modes


def _small_inputs(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = _gen(name)
    emb = _randn(g, 4, 6)
    proto = _randn(g, 9, 6, std=0.3)
    labels = torch.tensor([1, 4, -1, 4])
    return emb, proto, labels, torch.tensor([0, 1, 4, 7, 8]), torch.tensor([0, 2, 3, 5])


@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_exact(backend: str, margin_type: str) -> None:
    emb, proto, labels, cls, dims = _small_inputs("gradcheck")

    def fn(e: Tensor, p: Tensor) -> Tensor:
        return dual_partial_margin_loss(
            e,
            p,
            labels,
            scale=4.0,
            margin=0.4,
            margin_type=margin_type,
            margin_grad="exact",
            class_index=cls,
            dim_index=dims,
            backend=backend,
        )

    inputs = (emb.requires_grad_(True), proto.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_modes(backend: str) -> None:
    """Modes coincide for 'none'/'cosface'; differ for arcface (and fail gradcheck there)."""
    case = case_awkward_selected()
    for margin_type in ("none", "cosface"):
        a = run_library(case, backend, margin_type, "exact")
        b = run_library(case, backend, margin_type, "straight_through")
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)
        torch.testing.assert_close(a.grad_embeddings, b.grad_embeddings, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a.grad_prototypes, b.grad_prototypes, rtol=1e-10, atol=1e-13)
    a = run_library(case, backend, "arcface", "exact")
    b = run_library(case, backend, "arcface", "straight_through")
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)
    assert rel_err(a.grad_embeddings, b.grad_embeddings) > 1e-2
    assert rel_err(a.grad_prototypes, b.grad_prototypes) > 1e-2

    emb, proto, labels, cls, dims = _small_inputs("gradcheck")

    def fn(e: Tensor, p: Tensor) -> Tensor:
        return dual_partial_margin_loss(
            e,
            p,
            labels,
            scale=4.0,
            margin=0.4,
            margin_type="arcface",
            margin_grad="straight_through",
            class_index=cls,
            dim_index=dims,
            backend=backend,
        )

    inputs = (emb.requires_grad_(True), proto.requires_grad_(True))
    assert not torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, raise_exception=False)


# --------------------------------------------------------------------------- sampled runs


SAMPLING = {
    "classes30_dims50": {"class_sample_rate": 0.3, "dim_sample_rate": 0.5},
    "classes5_positives_dominate": {"class_sample_rate": 0.05, "dim_sample_rate": 1.0},
    "num_dims7": {"class_sample_rate": 1.0, "num_dims": 7},
}


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_selection(backend: str, sampling: str) -> None:
    """Sampled runs: finite, reproducible, of the documented size, and equal to the run
    with the explicit selection read back from the prototype gradient's support."""
    g = _gen("sampled")
    n, c, d = 18, 120, 20
    emb = _randn(g, n, d)
    proto = _randn(g, c, d, std=0.01)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[[2, 9]] = -1
    opts = SAMPLING[sampling]

    def run(seed: int) -> tuple[Tensor, Tensor, Tensor]:
        e, p = emb.clone().requires_grad_(True), proto.clone().requires_grad_(True)
        loss = dual_partial_margin_loss(
            e,
            p,
            labels,
            scale=32.0,
            margin=0.3,
            backend=backend,
            generator=torch.Generator().manual_seed(seed),
            **opts,  # type: ignore[arg-type]
        )
        loss.backward()
        assert e.grad is not None and p.grad is not None
        return loss.detach(), e.grad, p.grad

    loss, ge, gp = run(1234)
    assert torch.isfinite(loss) and torch.isfinite(ge).all() and torch.isfinite(gp).all()
    again = run(1234)
    assert torch.equal(loss, again[0]) and torch.equal(gp, again[2]), "not reproducible"

    sampled_cls = gp.abs().sum(1).nonzero().flatten()
    sampled_dims = gp.abs().sum(0).nonzero().flatten()
    positives = torch.unique(labels[labels != -1])
    n_cls = max(positives.numel(), int(float(opts["class_sample_rate"]) * c))
    k = int(opts.get("num_dims", round(float(opts.get("dim_sample_rate", 1.0)) * d)))
    assert sampled_cls.numel() == n_cls, f"{sampled_cls.numel()} sampled classes, want {n_cls}"
    assert sampled_dims.numel() == k, f"{sampled_dims.numel()} sampled dims, want {k}"
    assert set(positives.tolist()) <= set(sampled_cls.tolist()), "a positive was not sampled"
    mask = torch.zeros(d, dtype=torch.bool)
    mask[sampled_dims] = True
    assert not ge[:, ~mask].any(), "embedding gradient outside the sampled dims"

    want = oracle(emb, proto, labels, scale=32.0, margin=0.3, class_index=sampled_cls, dim_index=sampled_dims)
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-9)
    torch.testing.assert_close(ge, want.grad_embeddings, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gp, want.grad_prototypes, rtol=1e-9, atol=1e-12)


def test_auto_backend_is_torch_on_cpu() -> None:
    case = case_awkward_selected()
    a = run_library(case, "auto", "arcface", "straight_through")
    b = run_library(case, "torch", "arcface", "straight_through")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_prototypes, b.grad_prototypes)
