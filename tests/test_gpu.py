"""The ``triton`` backend on a CUDA device at real sizes (``-m gpu``; skipped without CUDA).

Run by ``benchmarks/gpu_check.sh`` with ``TRITON_INTERPRET=0`` (the test conftest would
otherwise select the interpreter). The float64 reference (``tests/triton_oracle.py``) is computed on
the GPU from the contract in docs/design.md, section 2: operands rounded to the compute dtype, then float64.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from tests.triton_oracle import oracle as _oracle
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from triton_oracle import oracle as _oracle  # type: ignore[no-redef]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1", reason="GPU tests need TRITON_INTERPRET=0 (gpu_check.sh)"
    ),
]

F64 = torch.float64
SHAPE_A = dict(N=4096, n=12500, k=512)


def _inputs(N, n, k, *, seed, ignored=0.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = F.normalize(torch.randn(N, k, device="cuda", generator=gen), dim=1)
    w = F.normalize(torch.randn(n, k, device="cuda", generator=gen), dim=1)
    target = torch.randint(0, n, (N,), device="cuda", generator=gen)
    if ignored:
        target[torch.rand(N, device="cuda", generator=gen) < ignored] = -1
    return x, w, target


def _run(x, w, target, **kw) -> tuple[Tensor, Tensor, Tensor]:
    from unicom_kernels.ops import triton_op

    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = triton_op.margin_softmax_loss(xn, wn, target, **kw)
    loss.backward()
    return loss.detach(), xn.grad, wn.grad


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm().clamp_min(1e-30)).item()


def _errors(x, w, target, **kw) -> tuple[float, float, float]:
    loss, gx, gw = _run(x, w, target, **kw)
    ref, rgx, rgw = _oracle(x, w, target, **kw)
    for t in (loss, gx, gw):
        assert torch.isfinite(t).all()
    errs = (abs(loss.item() - ref.item()) / max(abs(ref.item()), kw["scale"]), _rel(gx, rgx), _rel(gw, rgw))
    print(f"\n{kw} errors: loss {errs[0]:.2e}, grad_x {errs[1]:.2e}, grad_w {errs[2]:.2e}")
    return errs


def _kw(dtype=torch.bfloat16, scale=64.0, margin=0.5, margin_type="arcface", margin_grad="straight_through"):
    return dict(scale=scale, margin=margin, margin_type=margin_type, margin_grad=margin_grad, compute_dtype=dtype)


GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def test_shape_a_against_float64():
    x, w, target = _inputs(**SHAPE_A, seed=0)
    errs = _errors(x, w, target, **_kw())
    assert errs[0] < 1e-5 and errs[1] < GRAD_RTOL[torch.bfloat16] and errs[2] < GRAD_RTOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
@pytest.mark.parametrize("margin_type", ["arcface", "cosface", "none"])
def test_options(margin_type, margin_grad, dtype):
    # k = 200: padded to 208 on the host; n ragged; some rows ignored.
    x, w, target = _inputs(1000, 3001, 200, seed=1, ignored=0.1)
    kw = _kw(dtype, scale=32.0, margin=0.3, margin_type=margin_type, margin_grad=margin_grad)
    # fp32 operands follow torch's matmul precision: test the exact ("highest") setting.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        errs = _errors(x, w, target, **kw)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert errs[0] < 1e-5 and errs[1] < GRAD_RTOL[dtype] and errs[2] < GRAD_RTOL[dtype]


def test_tf32_setting_is_followed():
    x, w, target = _inputs(512, 2000, 256, seed=2)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        errs = _errors(x, w, target, **_kw(torch.float32))
    finally:
        torch.set_float32_matmul_precision(precision)
    assert errs[0] < 1e-4 and errs[1] < 1e-2 and errs[2] < 1e-2


def test_extreme_rows_s128():
    """Rows with all cosines ~ -1 (fixed shift s would underflow), exact +-1 cosines, N = 1."""
    k, n = 256, 5000
    x, w, target = _inputs(64, n, k, seed=3)
    v = F.normalize(torch.randn(k, device="cuda"), dim=0)
    w[: n // 2] = F.normalize(v + 1e-2 * torch.randn(n // 2, k, device="cuda"), dim=1)
    x[:8] = -v
    target[:8] = torch.arange(8, device="cuda")
    w[n - 1] = torch.eye(k, device="cuda")[0]
    x[8], target[8] = -torch.eye(k, device="cuda")[0], n - 1  # cosine exactly -1
    for margin_grad in ("straight_through", "exact"):
        errs = _errors(x, w, target, **_kw(torch.bfloat16, scale=128.0, margin=0.5, margin_grad=margin_grad))
        assert errs[0] < 1e-5 and errs[1] < 5e-3 and errs[2] < 5e-3
    errs = _errors(x[:1], w, target[:1], **_kw(torch.bfloat16, scale=128.0))
    assert errs[0] < 1e-5


def test_bitwise_deterministic_shape_a():
    x, w, target = _inputs(**SHAPE_A, seed=4, ignored=0.01)
    target[:256] = 7  # many rows share a class: the target scatter
    first = _run(x, w, target, **_kw())
    for _ in range(2):
        again = _run(x, w, target, **_kw())
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


def test_no_host_sync():
    x, w, target = _inputs(**SHAPE_A, seed=5)
    _run(x, w, target, **_kw())  # compile and warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(x, w, target, **_kw())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_transient_memory_shape_a():
    """No [N, n] fp32 buffer: peak extra memory of forward + backward stays far below N*n*4 bytes."""
    x, w, target = _inputs(**SHAPE_A, seed=6)
    _run(x, w, target, **_kw())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(x, w, target, **_kw())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    N, n, k = SHAPE_A.values()
    grads_and_copies = (N + n) * k * (4 + 4 + 2 + 4)  # xn/wn clones, fp32 grads, bf16 copies, fp32 kernel grads
    print(f"\npeak transient memory at shape A: {peak / 2**20:.1f} MiB (logits would be {N * n * 4 / 2**20:.0f} MiB)")
    assert peak - grads_and_copies < 64 * 2**20


def test_torch_compile():
    from unicom_kernels.ops import triton_op

    x, w, target = _inputs(256, 1000, 128, seed=7)

    def step(xn, wn):
        return triton_op.margin_softmax_loss(xn, wn, target, **_kw()) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    compiled(xn, wn).backward()
    loss, gx, gw = _run(x, w, target, **_kw())
    torch.testing.assert_close(xn.grad, 2 * gx, rtol=1e-6, atol=0)
    torch.testing.assert_close(wn.grad, 2 * gw, rtol=1e-6, atol=0)


def test_lse_and_target_sharded_equals_fused():
    """Classes split over four simulated ranks and combined like the distributed loss: same result."""
    from unicom_kernels.ops import triton_op

    x, w, target = _inputs(2048, 12000, 256, seed=8, ignored=0.02)
    kw = _kw()
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    fused = triton_op.margin_softmax_loss(xa, wa, target, **kw)
    fused.backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    bounds = (0, 2500, 6001, 9000, 12000)
    stats = [
        triton_op.lse_and_target(xb, wb[lo:hi], torch.where((target >= lo) & (target < hi), target - lo, -1), **kw)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
    z_t = sum(s[1] for s in stats)
    valid = target >= 0
    loss = torch.where(valid, lse - z_t, 0.0).sum() / valid.sum()
    loss.backward()
    assert abs(loss.item() - fused.item()) <= 1e-5 * abs(fused.item())
    assert _rel(xb.grad, xa.grad) < 2e-3 and _rel(wb.grad, wa.grad) < 2e-3


@pytest.mark.parametrize("where", ["nan_prototype", "inf_prototype", "nan_embedding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_inputs_give_a_nan_loss(where, dtype):
    """A NaN or inf operand must surface as a NaN loss (the GPU's min/max drop NaN unless told not to)."""
    from unicom_kernels.ops import triton_op

    x, w, target = _inputs(300, 2001, 128, seed=9)
    if where == "nan_prototype":
        w[17, 5] = float("nan")
    elif where == "inf_prototype":
        w[1999, 0] = float("inf")
    else:
        x[3, 7] = float("nan")
    kw = _kw(dtype)
    loss, gx, gw = _run(x, w, target, **kw)
    assert loss.isnan(), f"loss {loss.item()} for {where}"
    lse, _z_t = triton_op.lse_and_target(x, w, target, **kw)
    assert lse.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_module_under_autocast(dtype):
    """fp32 backbone outputs under CUDA autocast: bf16/fp16 GEMMs, fp32 loss, gradients in their dtypes."""
    from unicom_kernels import DualPartialMarginLoss

    torch.manual_seed(10)
    backbone = torch.nn.Linear(256, 128).cuda()
    criterion = DualPartialMarginLoss(5000, 128, scale=64.0, margin=0.5, device="cuda")
    images = torch.randn(512, 256, device="cuda")
    labels = torch.randint(0, 5000, (512,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        embeddings = backbone(images)
        loss = criterion(embeddings, labels)
    loss.backward()
    assert embeddings.dtype == dtype and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert criterion.weight.grad.dtype == torch.float32 and torch.isfinite(criterion.weight.grad).all()
    assert torch.isfinite(backbone.weight.grad).all()


def _training_step_parts(seed: int = 11):
    from unicom_kernels import DualPartialMarginLoss

    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    # int(0.1 * 100_000) >= 1024 rows: a fixed-size class set; no value checks: nothing is read back.
    criterion = DualPartialMarginLoss(100_000, 256, class_sample_rate=0.1, check_values=False, device="cuda")
    params = [*backbone.parameters(), *criterion.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, capturable=True)
    images = torch.randn(1024, 256, device="cuda")
    labels = torch.randint(0, 100_000, (1024,), device="cuda")

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(backbone(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, criterion


def test_training_step_never_syncs():
    step, _ = _training_step_parts()
    for _ in range(3):  # compile the kernels, create the optimizer state
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_training_step_replays_in_a_cuda_graph():
    """Backbone, loss and optimizer captured once; each replay is a new step with a new sample."""
    step, criterion = _training_step_parts()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    before = criterion.step
    sampled = []
    for _ in range(5):
        graph.replay()
        sampled.append(criterion.last_class_index.clone())
    torch.cuda.synchronize()
    assert criterion.step == before + 5 and torch.isfinite(loss)
    assert not torch.equal(sampled[0], sampled[1]), "replays must draw new classes"
