"""The ``triton`` backend against a float64 oracle, on the CPU through ``TRITON_INTERPRET=1``.

The oracle (``tests/triton_oracle.py``) is written from docs/design.md, section 2 and shares no
code with the library.

Tiles are shrunk to 16/32 (``override_configs``) so that small problems still cover many
tiles, several forward splits and several backward class chunks, with ragged edges in
every dimension.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from unicom_kernels.ops import triton_op
from unicom_kernels.triton import lse_forward, override_configs

try:
    from tests.largest_tensor import LargestTensor
    from tests.triton_oracle import oracle, oracle_stats, unit_operand
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from largest_tensor import LargestTensor  # type: ignore[no-redef]
    from triton_oracle import oracle, oracle_stats, unit_operand  # type: ignore[no-redef]

F64 = torch.float64
MARGIN_TYPES = ("arcface", "cosface", "none")
MARGIN_GRADS = ("straight_through", "exact")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Relative error bounds against float64 (loss: relative to max(|loss|, s); gradients: relative
# L2 norm of the error). The loss is exact up to fp32 rounding in every
# dtype (the operands are rounded identically in the oracle); the gradients go through the
# softmax-gradient workspace, stored in fp16 for bf16/fp16 (11 bits of mantissa).
LOSS_RTOL = 2e-6
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# The per-row statistics keep a bf16 workspace for bf16 (8 bits: rows of very different weight
# stay out of fp16's subnormals); eager bf16 autograd of the same inputs is 3.0e-3 off.
STATS_GRAD_RTOL = {**GRAD_RTOL, torch.bfloat16: 4e-3}


# --------------------------------------------------------------------------- helpers


def _inputs(N: int, n: int, k: int, *, seed: int, ignored: float = 0.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N, k, generator=gen, dtype=F64), dim=1)
    w = F.normalize(torch.randn(n, k, generator=gen, dtype=F64), dim=1)
    target = torch.randint(0, n, (N,), generator=gen)
    if ignored:
        target[torch.rand(N, generator=gen) < ignored] = -1
    return x.to(dtype), w.to(dtype), target


def _run(x: Tensor, w: Tensor, target: Tensor, **kw) -> tuple[Tensor, Tensor, Tensor]:
    xn = x.clone().requires_grad_()
    wn = w.clone().requires_grad_()
    loss = triton_op.margin_softmax_loss(xn, wn, target, **kw)
    loss.backward()
    return loss.detach(), xn.grad, wn.grad


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(x, w, target, *, grad_rtol=None, **kw) -> tuple[float, float, float]:
    loss, gx, gw = _run(x, w, target, **kw)
    ref_loss, ref_gx, ref_gw = oracle(x, w, target, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    for t in (loss, gx, gw):
        assert torch.isfinite(t).all()
    errs = (
        # Relative to max(|loss|, s): LSE and z_t are each up to ~s, so their fp32
        # rounding is relative to s even when the loss is small.
        abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), kw["scale"]),
        _rel(gx, ref_gx),
        _rel(gw, ref_gw),
    )
    rtol = grad_rtol if grad_rtol is not None else GRAD_RTOL[kw["compute_dtype"]]
    assert errs[0] <= LOSS_RTOL, errs
    assert errs[1] <= rtol and errs[2] <= rtol, errs
    return errs


def _kw(dtype=torch.float32, *, scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through"):
    return dict(scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad, compute_dtype=dtype)


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin_grad", MARGIN_GRADS)
@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_options_against_oracle(margin_type, margin_grad, dtype):
    x, w, target = _inputs(37, 101, 40, seed=1, ignored=0.2)
    with override_configs(block=16, workspace_bytes=37 * 48 * 4):  # several backward chunks
        _check(x, w, target, **_kw(dtype, scale=32.0, margin=0.35, margin_type=margin_type, margin_grad=margin_grad))


@pytest.mark.parametrize(
    "N, n, k, block",
    [
        (1, 1, 1, 16),  # N = 1, n = 1, k = 1
        (1, 300, 33, 16),  # one row, many tiles
        (50, 2, 17, 16),  # tiny n
        (70, 257, 70, 32),  # ragged everywhere, larger tiles
        (16, 64, 16, 16),  # exact multiples of the tile
        (33, 513, 9, 16),  # 33 class tiles of 16: many forward splits
    ],
)
def test_shapes(N, n, k, block):
    x, w, target = _inputs(N, n, k, seed=N * 1000 + n)
    with override_configs(block=block, workspace_bytes=max(1, N * 40 * 4), target_programs=8):
        _check(x, w, target, **_kw(torch.float32, margin_type="arcface", margin_grad="exact"))


def test_flattened_forward_loop():
    """The flatten_forward variant (tl.range(..., flatten=True)) computes the same loss."""
    from unicom_kernels.triton.lse_forward import SUPPORTS_FLATTEN

    if not SUPPORTS_FLATTEN:
        pytest.skip("this Triton has no tl.range(flatten=...)")
    x, w, target = _inputs(40, 200, 32, seed=23)
    with override_configs(block=16, target_programs=4, flatten_forward=True):
        _check(x, w, target, **_kw(torch.bfloat16))


def test_default_configs_small_problem():
    """The interpreter defaults (no override) and one backward chunk."""
    x, w, target = _inputs(20, 90, 24, seed=3)
    _check(x, w, target, **_kw(torch.bfloat16))


def test_fp16_bf16_inputs_keep_their_dtype():
    x, w, target = _inputs(24, 60, 32, seed=4)
    with override_configs(block=16):
        # The gradients come back rounded to the input dtype (bf16: 2^-9 relative).
        _check(x.to(torch.bfloat16), w, target, grad_rtol=5e-3, **_kw(torch.bfloat16))
        _check(x.to(torch.float16), w.to(torch.float16), target, grad_rtol=2e-3, **_kw(torch.float16))


def test_shared_targets_scatter():
    """Many rows per class: the sorted, atomic-free target scatter of the prototype gradient."""
    x, w, _ = _inputs(45, 50, 20, seed=5)
    target = torch.tensor([3] * 20 + [17] * 10 + [-1] * 5 + [49] * 5 + [0] * 5)
    with override_configs(block=16, workspace_bytes=45 * 16 * 4):
        for margin_grad in MARGIN_GRADS:
            _check(x, w, target, **_kw(torch.float32, margin_type="cosface", margin_grad=margin_grad))


def test_large_batches_group_the_rows_by_a_sort():
    """Above ``group_compare_rows`` the forward sorts the rows instead of comparing every pair:
    the same stable order, so bitwise the same loss and gradients."""
    x, w, _ = _inputs(45, 50, 20, seed=25)
    target = torch.tensor([3] * 20 + [17] * 10 + [-1] * 5 + [49] * 5 + [0] * 5)[torch.randperm(45)]
    kw = _kw(torch.bfloat16, margin_grad="exact")
    with override_configs(block=16, workspace_bytes=45 * 16 * 4):
        compared = _run(x, w, target, **kw)
        with override_configs(group_compare_rows=44):
            sorted_ = _run(x, w, target, **kw)
    for a, b in zip(compared, sorted_, strict=True):
        assert torch.equal(a, b)
    # Both groupings are the stable sort by target, rows without one last.
    want_key, want_order = torch.sort(torch.where(target >= 0, target, 50), stable=True)
    for rows in (45, 44):  # compared in the kernel; sorted on the host
        with override_configs(block=16, group_compare_rows=rows):
            stats = lse_forward(x, w, target, scale=64.0, margin=0.5, margin_type="arcface", margin_grad="exact")
        assert torch.equal(stats.order, want_order) and torch.equal(stats.sorted_key, want_key)


def test_all_rows_ignored():
    x, w, _ = _inputs(10, 30, 16, seed=6)
    target = torch.full((10,), -1)
    with override_configs(block=16):
        loss, gx, gw = _run(x, w, target, **_kw(torch.bfloat16))
    assert loss.item() == 0.0
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0


# --------------------------------------------------------------------------- adversarial rows


def _adversarial(N: int, n: int, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows whose logits are all ~ -s, rows at cosine +-1, theta + m > pi, mixed with random rows.

    Prototypes 3..n/2 are near one direction v (cosine ~0.998 with it), the rest random;
    prototypes 1 and 2 are the basis vectors e_0 and e_1, so that cosines of exactly +-1 are
    exact in every precision (a cosine one fp32 rounding away from +-1 is ill-conditioned for
    arcface, whose derivative is unbounded there: no fp32 backend could match float64 on it).
    row 0: x = -v, target 3 -> every cosine with the v-cluster ~ -1, theta_t + m > pi.
    row 1: x = e_0, target 1 -> target cosine exactly 1.
    row 2: x = -e_1, target 2 -> target cosine exactly -1.
    row 3: x = -v, target in the random half.
    rows 4..: random; every other one aimed near its target's antipode (theta + m > pi).
    """
    gen = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(k, generator=gen, dtype=F64), dim=0)
    half = n // 2
    w = torch.cat(
        [v + 1e-2 * torch.randn(half, k, generator=gen, dtype=F64), torch.randn(n - half, k, generator=gen, dtype=F64)]
    )
    w = F.normalize(w, dim=1).float()
    w[1], w[2] = torch.eye(k)[0], torch.eye(k)[1]
    x = F.normalize(torch.randn(N, k, generator=gen, dtype=F64), dim=1).float()
    target = torch.randint(0, n, (N,), generator=gen)
    x[0], target[0] = -v.float(), 3
    x[1], target[1] = torch.eye(k)[0], 1
    x[2], target[2] = -torch.eye(k)[1], 2
    x[3], target[3] = -v.float(), n - 1
    for i in range(4, N, 2):
        x[i] = F.normalize(-w[target[i]] + 0.2 * torch.randn(k, generator=gen), dim=0)
    return x, w, target


@pytest.mark.parametrize("margin_grad", MARGIN_GRADS)
@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_adversarial_rows_scale_128(margin_type, margin_grad):
    x, w, target = _adversarial(24, 90, 32, seed=7)
    with override_configs(block=16, workspace_bytes=24 * 32 * 4):
        _check(
            x,
            w,
            target,
            **_kw(torch.float32, scale=128.0, margin=0.5, margin_type=margin_type, margin_grad=margin_grad),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_near_unit_cosines_stay_finite(dtype):
    """x = w_t up to rounding: cosines within an ulp of +-1, exact arcface; no NaN/inf anywhere."""
    x, w, target = _inputs(12, 30, 16, seed=17)
    x[:6] = w[target[:6]]
    x[6:] = -w[target[6:]]
    with override_configs(block=16):
        for t in _run(x, w, target, **_kw(dtype, scale=128.0, margin=0.5, margin_grad="exact")):
            assert torch.isfinite(t).all()


def test_all_logits_very_negative():
    """Every logit of the row is ~ -128: exp(z - 128) underflows fp32, the running max must not."""
    gen = torch.Generator().manual_seed(8)
    v = F.normalize(torch.randn(16, generator=gen), dim=0)
    w = F.normalize(v + 1e-4 * torch.randn(40, 16, generator=gen), dim=1)
    x = -v.expand(3, 16).clone()
    target = torch.tensor([0, 5, 39])
    with override_configs(block=16):
        for dtype in DTYPES:
            kw = _kw(dtype, scale=128.0, margin=0.5, margin_type="cosface")
            loss, _, _ = _run(x, w, target, **kw)
            ref, _, _ = oracle(x, w, target, **kw)
            assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-4


def test_bf16_shape_of_shape_a_semantics():
    """s = 64, m = 0.5 arcface in bf16 (shape A's options) on a small problem."""
    x, w, target = _inputs(64, 200, 64, seed=9, ignored=0.05)
    with override_configs(block=32, workspace_bytes=64 * 64 * 2):
        _check(x, w, target, **_kw(torch.bfloat16, scale=64.0, margin=0.5))


# --------------------------------------------------------------------------- target-logit kernel


@pytest.mark.parametrize("margin_grad", MARGIN_GRADS)
@pytest.mark.parametrize("margin_type", MARGIN_TYPES)
def test_target_logit_kernel_matches_margin_module(margin_type, margin_grad):
    """The fused kernel's margin formulas are those of unicom_kernels.margin, at +-1 and beyond too."""
    from unicom_kernels.margin import target_logit as reference_target_logit

    # Rows x = (c, sqrt(1 - c^2)) against the prototype e_0: raw cosine c exactly, |c| <= 1;
    # plus rows scaled by 1 + 2^-20 so that |raw| > 1 (outside the clamp: zero slope).
    c = torch.cat([torch.linspace(-1.0, 1.0, 41), torch.tensor([-1.0, 1.0, 0.9999999, -0.9999999])])
    x = torch.stack([c, (1.0 - c * c).clamp_min(0).sqrt()], dim=1)
    x = torch.cat([x, x[[0, 40]] * (1.0 + 2.0**-20)])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.zeros(x.shape[0], dtype=torch.long)
    kw = dict(scale=64.0, margin=0.5, margin_type=margin_type, margin_grad=margin_grad)
    stats = lse_forward(x, w, target, **kw)
    z_t, dz_dc = stats.z_t, stats.dz_dc
    raw = x[:, 0]
    want_z, want_dz = reference_target_logit(raw.clamp(-1.0, 1.0), **kw)
    want_dz = want_dz * (raw.abs() < 1.0)
    torch.testing.assert_close(z_t, want_z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dz_dc, want_dz, rtol=1e-5, atol=1e-4)
    assert torch.all(dz_dc[-2:] == 0)


# --------------------------------------------------------------------------- lse_and_target


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin_type, margin_grad", [("arcface", "exact"), ("cosface", "straight_through")])
def test_lse_and_target_any_upstream_gradient(margin_type, margin_grad, dtype):
    """Forward values and the gradients of an arbitrary combination sum(u * lse + v * z_t)."""
    x, w, target = _inputs(30, 77, 24, seed=20, ignored=0.3)
    kw = _kw(dtype, scale=64.0, margin=0.4, margin_type=margin_type, margin_grad=margin_grad)
    gen = torch.Generator().manual_seed(21)
    u, v = torch.randn(30, generator=gen, dtype=F64), torch.randn(30, generator=gen, dtype=F64)
    u[3] = 0.0  # a row that only reaches the loss through z_t
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    with override_configs(block=16, workspace_bytes=30 * 32 * 4):
        lse, z_t = triton_op.lse_and_target(xn, wn, target, **kw)
        ((u.float() * lse).sum() + (v.float() * z_t).sum()).backward()
    x64, xu = unit_operand(x, dtype)
    w64, wu = unit_operand(w, dtype)
    kw64 = {key: val for key, val in kw.items() if key != "compute_dtype"}
    ref_lse, ref_zt = oracle_stats(xu, wu, target, **kw64)
    ((u * ref_lse).sum() + (v * ref_zt).sum()).backward()
    assert lse.dtype == z_t.dtype == torch.float32
    assert (lse.detach().double() - ref_lse.detach()).abs().max() <= 2e-6 * 64
    assert (z_t.detach().double() - ref_zt.detach()).abs().max() <= 2e-6 * 64
    assert torch.all(z_t[target < 0] == 0)
    assert _rel(xn.grad, x64.grad) <= STATS_GRAD_RTOL[dtype] and _rel(wn.grad, w64.grad) <= STATS_GRAD_RTOL[dtype]


def test_lse_and_target_rows_of_tiny_weight_keep_their_precision():
    """Across ranks a row's weight on one shard can be 1e-10 of another's: such rows keep the
    per-row precision of the eager bf16 backend (an fp16 workspace would hold them as subnormals)."""
    from unicom_kernels.ops import torch_chunked

    x, w, target = _inputs(6, 70, 32, seed=23)
    weights = torch.tensor([1.0, 1e-6, 1e-8, 1e-10, 1.0, 1e-9], dtype=F64)
    kw = _kw(torch.bfloat16, scale=64.0, margin=0.5)

    def row_grads(backend, compute_dtype):
        dtype = F64 if compute_dtype == F64 else x.dtype
        xn, wn = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        lse, z_t = backend.lse_and_target(xn, wn, target, **{**kw, "compute_dtype": compute_dtype})
        ((lse - z_t).double() * weights).sum().backward()
        return xn.grad.double()

    with override_configs(block=16):
        fused = row_grads(triton_op, torch.bfloat16)
    eager = row_grads(torch_chunked, torch.bfloat16)
    exact = row_grads(torch_chunked, F64)
    error = (fused - exact).norm(dim=1) / exact.norm(dim=1)
    eager_error = (eager - exact).norm(dim=1) / exact.norm(dim=1)
    assert torch.all(error <= 2 * eager_error + 1e-3), (error, eager_error)


def test_lse_and_target_sharded_equals_fused():
    """Classes split over two simulated ranks, combined like loss.py does: same loss and grads."""
    x, w, target = _inputs(26, 90, 20, seed=22, ignored=0.1)
    kw = _kw(torch.float32, scale=32.0, margin=0.3)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    with override_configs(block=16):
        loss_fused = triton_op.margin_softmax_loss(xa, wa, target, **kw)
        loss_fused.backward()
        stats = []
        for lo, hi in ((0, 41), (41, 90)):
            local = torch.where((target >= lo) & (target < hi), target - lo, -1)
            stats.append(triton_op.lse_and_target(xb, wb[lo:hi], local, **kw))
        lse = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
        z_t = stats[0][1] + stats[1][1]
        valid = target >= 0
        loss = torch.where(valid, lse - z_t, 0.0).sum() / valid.sum()
        loss.backward()
    assert abs(loss.item() - loss_fused.item()) <= 1e-5 * loss_fused.item()
    assert _rel(xb.grad, xa.grad) <= 1e-5 and _rel(wb.grad, wa.grad) <= 1e-5


# --------------------------------------------------------------------------- contract details


def test_fp64_compute_dtype_raises():
    x, w, target = _inputs(4, 8, 8, seed=10)
    with pytest.raises(ValueError, match="compute_dtype"):
        triton_op.margin_softmax_loss(x.double(), w.double(), target, **_kw(torch.float64))


def test_bitwise_repeatable():
    x, w, target = _inputs(40, 150, 48, seed=11, ignored=0.1)
    target[:10] = 7  # shared targets go through the scatter
    with override_configs(block=16, workspace_bytes=40 * 48 * 2):
        first = _run(x, w, target, **_kw(torch.bfloat16, margin_grad="exact"))
        second = _run(x, w, target, **_kw(torch.bfloat16, margin_grad="exact"))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_grad_for_unneeded_inputs():
    x, w, target = _inputs(8, 20, 16, seed=12)
    wn = w.clone().requires_grad_()
    with override_configs(block=16):
        loss = triton_op.margin_softmax_loss(x, wn, target, **_kw())
        loss.backward()
    assert wn.grad is not None and torch.isfinite(wn.grad).all()


def test_grad_output_scaling():
    x, w, target = _inputs(12, 40, 16, seed=13)
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    with override_configs(block=16):
        loss = triton_op.margin_softmax_loss(xn, wn, target, **_kw())
        (3.0 * loss).backward()
        _, gx, gw = _run(x, w, target, **_kw())
    torch.testing.assert_close(xn.grad, 3.0 * gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wn.grad, 3.0 * gw, rtol=1e-5, atol=1e-7)


def test_opcheck():
    x, w, target = _inputs(20, 50, 24, seed=14, ignored=0.1)
    with override_configs(block=16, workspace_bytes=20 * 16 * 4):
        for dtype in (torch.float32, torch.bfloat16):
            args = (
                x.clone().requires_grad_(),
                w.clone().requires_grad_(),
                target,
                32.0,
                0.3,
                "arcface",
                "exact",
                dtype,
            )
            torch.library.opcheck(torch.ops.unicom_kernels.triton_margin_softmax.default, args)
            torch.library.opcheck(torch.ops.unicom_kernels.triton_lse_and_target.default, args)
        lse = torch.randn(20) + 5.0
        rowscale = torch.rand(20) * 2 - 1
        tcoef = torch.randn(20)
        operands = [t for pair in triton_op._operands(x, w, torch.float32) for t in pair]
        order, sorted_key = torch.sort(torch.where(target >= 0, target, w.shape[0]), stable=True)[::-1]
        saved = (x, w, *operands, order, sorted_key, target, lse, tcoef)
        for count, scales in ((None, rowscale), (torch.tensor(7.0), None)):  # per-row statistics, mean loss
            bargs = (*saved, torch.tensor(0.25), count, scales, 32.0)
            torch.library.opcheck(torch.ops.unicom_kernels.triton_margin_softmax_backward.default, bargs)


def test_torch_compile_traces_through():
    x, w, target = _inputs(16, 40, 16, seed=15)

    def step(xn, wn, target):
        return triton_op.margin_softmax_loss(xn, wn, target, **_kw(torch.bfloat16)) * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with override_configs(block=16):
        xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = compiled(xn, wn, target)
        loss.backward()
        ref, gx, gw = _run(x, w, target, **_kw(torch.bfloat16))
    torch.testing.assert_close(loss.detach(), 2.0 * ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(xn.grad, 2.0 * gx, rtol=1e-6, atol=0)
    torch.testing.assert_close(wn.grad, 2.0 * gw, rtol=1e-6, atol=0)


def test_workspace_is_bounded():
    """No tensor of N * n elements or more is created (forward and backward)."""
    N, n, k = 32, 400, 16
    x, w, target = _inputs(N, n, k, seed=16)
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    with override_configs(block=16, workspace_bytes=N * 64 * 4, target_programs=4):
        with LargestTensor() as mode:
            triton_op.margin_softmax_loss(xn, wn, target, **_kw()).backward()
    # The biggest buffers: the workspace (N x 64) and grad_w (n x k); never N x n.
    assert mode.largest <= max(N * 64, n * k) < N * n


@pytest.mark.parametrize("shapes", [((0, 16), (5, 16)), ((4, 16), (0, 16))])
def test_empty_operands_are_named(shapes):
    from unicom_kernels.ops import triton_op

    (xs, ws) = shapes
    x, w = torch.randn(*xs), torch.randn(*ws)
    target = torch.zeros(xs[0], dtype=torch.int64)
    for entry in (triton_op.margin_softmax_loss, triton_op.lse_and_target):
        with pytest.raises(ValueError, match="N, n, k >= 1"):
            entry(x, w, target, scale=32.0, margin=0.3, margin_type="arcface", margin_grad="exact",
                  compute_dtype=torch.float32)  # fmt: skip


def test_operands_beyond_int32_offsets_are_refused():
    """4.2M classes x 512 dims on one rank would overflow the kernels' int32 element offsets."""
    from unicom_kernels.ops import triton_op

    w = torch.empty(2**31 // 512, 512, device="meta")  # no memory: the check looks at shapes only
    x = torch.empty(8, 512, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        triton_op._check(x, w, torch.empty(8, dtype=torch.int64, device="meta"), torch.bfloat16)


def test_workspace_grows_with_the_rows_on_a_gpu():
    """With many rows the GPU configs let the workspace reach the size of grad_x: few chunks."""
    from unicom_kernels.triton.backward import chunk_columns, workspace_budget
    from unicom_kernels.triton.configs import GPU_CONFIGS

    def chunks(N, n, k):
        block_n = GPU_CONFIGS.grad_logits.block_n
        return -(-n // chunk_columns(N, n, 2, block_n, workspace_budget(N, k, GPU_CONFIGS)))

    assert chunks(4096, 12_500, 512) == 3  # shape A: the fixed 40 MiB cap decides
    assert chunks(65_536, 12_500, 512) <= 13  # a fixed cap would give 49
    assert workspace_budget(65_536, 512, replace(GPU_CONFIGS, workspace_follows_grad_x=False)) == 40 << 20


def test_grown_workspace_gives_the_same_result():
    x, w, target = _inputs(40, 300, 24, seed=21, ignored=0.1)
    kw = _kw(torch.float32)
    with override_configs(block=16, workspace_bytes=40 * 16 * 4, workspace_follows_grad_x=False):
        small = _run(x, w, target, **kw)  # one 16-class chunk at a time
    with override_configs(block=16, workspace_bytes=40 * 16 * 4, workspace_follows_grad_x=True):
        grown = _run(x, w, target, **kw)  # 40 x 32 x 4 bytes: 32-class chunks
    for a, b in zip(small, grown, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
