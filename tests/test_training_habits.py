"""The loss in ordinary training code: autocast, eval mode for validation, logits for classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ranks import spawn
from sync_ops import NoHostSync

from unicom_kernels import DualPartialMarginLoss, class_range, dual_partial_margin_loss
from unicom_kernels.ops import get_backend, mean_loss, torch_chunked

B, C, D = 11, 37, 24  # not multiples of any block
BACKENDS = ("reference", "torch", "triton")  # triton is interpreted on the CPU
KW = dict(scale=32.0, margin=0.3, margin_type="arcface", margin_grad="straight_through")


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randn(C, D, generator=gen), torch.randint(0, C, (B,), generator=gen)


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_bf16_on_cpu(backend, dtype):
    """Inside autocast the GEMMs take autocast's dtype, as a matmul would; the rest follows the contract."""
    x, w, y = _inputs()
    xa, wa = x.to(dtype, copy=True).requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dual_partial_margin_loss(xa, wa, y, backend=backend, **KW)
    loss.backward()
    assert loss.dtype == torch.float32 and xa.grad.dtype == dtype and wa.grad.dtype == torch.float32
    # The same as the backend asked for bf16 operands outside autocast.
    xb, wb = x.to(dtype, copy=True).requires_grad_(), w.clone().requires_grad_()
    expected = mean_loss(get_backend(backend, x.device), xb, wb, y, compute_dtype=torch.bfloat16, **KW)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-7)


def test_autocast_module_in_a_training_step():
    torch.manual_seed(0)
    x, _, y = _inputs()
    backbone = torch.nn.Linear(D, D)
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.5)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *criterion.parameters()], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = backbone(x)
        assert embeddings.dtype == torch.bfloat16
        loss = criterion(embeddings, y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and criterion.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------- eval mode and logits


def test_eval_mode_uses_every_class_and_dim_without_margin_and_keeps_the_step():
    x, w, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.1, dim_sample_rate=0.5, **KW)
    with torch.no_grad():
        criterion.weight.copy_(w)
    criterion.eval()
    first = criterion(x, y)
    assert criterion.step == 0
    assert torch.equal(criterion.last_class_index, torch.arange(C)) and criterion.last_dim_index is None
    assert torch.equal(criterion(x, y), first), "eval loss must not be a random draw"
    expected = dual_partial_margin_loss(x, w, y, scale=KW["scale"], margin_type="none")
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    # ... which is the cross-entropy of the logits.
    torch.testing.assert_close(first, F.cross_entropy(criterion.logits(x), y), rtol=1e-5, atol=1e-5)
    # Training resumes with the draw of step 0, as if no evaluation had happened.
    criterion.train()
    trained = criterion(x, y)
    fresh = DualPartialMarginLoss(C, D, class_sample_rate=0.1, dim_sample_rate=0.5, **KW)
    with torch.no_grad():
        fresh.weight.copy_(w)
    torch.testing.assert_close(trained, fresh(x, y), rtol=0, atol=0)
    assert torch.equal(criterion.last_class_index, fresh.last_class_index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_logits_are_scaled_cosines(dtype):
    x, w, _ = _inputs()
    criterion = DualPartialMarginLoss(C, D, scale=16.0).to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        criterion.weight.copy_(w)
    x = x.to(dtype)
    got = criterion.logits(x)
    expected = 16.0 * F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    assert got.shape == (B, C) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.2}[dtype]  # bf16 operands, fp32 products
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(criterion.logits(x, chunk_rows=4), got, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        criterion.logits(x[:, :5])
    with pytest.raises(ValueError, match="chunk_rows"):
        criterion.logits(x, chunk_rows=0)


def _scenario_eval_sharded(rank, world, group):
    x, w, y = _inputs()
    start, stop = class_range(C, rank, world)
    criterion = DualPartialMarginLoss(C, D, process_group=group, class_sample_rate=0.1, **KW)
    with torch.no_grad():
        criterion.weight.copy_(w[start:stop])
    criterion.eval()
    rows = slice(rank * (B // world), (rank + 1) * (B // world))
    loss = criterion(x[rows], y[rows])
    return {"loss": loss.detach(), "logits": criterion.logits(x), "step": criterion.step}


def test_eval_mode_and_logits_sharded(tmp_path):
    results = spawn(2, _scenario_eval_sharded, tmp_path)
    x, w, y = _inputs()
    rows = slice(0, 2 * (B // 2))
    expected = dual_partial_margin_loss(x[rows], w, y[rows], scale=KW["scale"], margin_type="none")
    for res in results:
        assert res["step"] == 0
        torch.testing.assert_close(res["loss"], expected, rtol=1e-6, atol=1e-6)
    single = DualPartialMarginLoss(C, D, scale=KW["scale"])
    with torch.no_grad():
        single.weight.copy_(w)
    torch.testing.assert_close(torch.cat([res["logits"] for res in results], dim=1), single.logits(x))


# --------------------------------------------------------------------------- no host synchronisation


@pytest.fixture
def as_on_cuda(monkeypatch):
    """The torch backend takes its accelerator path: reading a value is not free there."""
    monkeypatch.setattr(torch_chunked, "_host_reads_are_free", lambda device: False)


def _module_step(criterion, x, y):
    xg = x.clone().requires_grad_()
    criterion(xg, y).backward()
    return xg.grad


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_module_step_never_waits_without_value_checks(backend, as_on_cuda):
    """int(rate * C) >= rows: a fixed-size class set; check_values=False: nothing is read back."""
    x, _, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, dim_sample_rate=0.5, backend=backend)
    criterion.check_values = False
    for _ in range(2):
        with NoHostSync():
            _module_step(criterion, x, y)
    assert criterion.step == 2


def test_module_step_waits_once_with_value_checks(as_on_cuda):
    x, _, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, dim_sample_rate=0.5)
    with NoHostSync(allow=1) as probe:
        _module_step(criterion, x, y)
    assert len(probe.seen) == 1 and "_checks.py" in probe.seen[0], probe.seen


def test_fewer_sampled_classes_than_rows_count_the_positives_once(as_on_cuda):
    x, _, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.1, check_values=False)  # int(0.1 * 37) < 11 rows
    with NoHostSync(allow=1) as probe:
        _module_step(criterion, x, y)
    assert len(probe.seen) == 1 and "sampling.py" in probe.seen[0], probe.seen


def _scenario_sharded_step_never_waits(rank, world, group):
    x, _, y = _inputs()
    torch_chunked._host_reads_are_free = lambda device: False  # this process only
    criterion = DualPartialMarginLoss(C, D, process_group=group, class_sample_rate=0.6, check_values=False)
    rows = slice(rank * 5, rank * 5 + 5)
    waits = None
    try:
        with NoHostSync():
            _module_step(criterion, x[rows], y[rows])
    except AssertionError as exc:
        waits = str(exc)
    return {"waits": waits, "class_index": criterion.last_class_index, "dim_index": criterion.last_dim_index}


def test_sharded_module_step_never_waits_without_value_checks(tmp_path):
    results = spawn(2, _scenario_sharded_step_never_waits, tmp_path)
    for res in results:
        assert res["waits"] is None, res["waits"]
    assert torch.equal(results[0]["dim_index"], results[1]["dim_index"])


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("check_values", [True, False])
def test_compiles_once_for_every_step(backend, check_values):
    """fullgraph: no graph break; the step is a device buffer, so 20 steps reuse one graph."""
    torch._dynamo.reset()
    x, _, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, backend=backend, check_values=check_values)
    eager = DualPartialMarginLoss(C, D, class_sample_rate=0.3, backend=backend, check_values=check_values)
    eager.load_state_dict(criterion.state_dict())
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda e, t: criterion(e, t), fullgraph=True, backend=counting_backend)
    for _ in range(20):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = compiled(xc, y)
        loss.backward()
        expected = eager(xe, y)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(criterion.last_class_index, eager.last_class_index)
    assert len(frames) == 1, f"compiled {len(frames)} times"
    assert criterion.step == 20


def _scenario_sharded_step_reads_only_the_agreement(rank, world, group):
    x, _, y = _inputs()
    torch_chunked._host_reads_are_free = lambda device: False  # this process only
    criterion = DualPartialMarginLoss(C, D, process_group=group, class_sample_rate=0.6)
    rows = slice(rank * 5, rank * 5 + 5)
    with NoHostSync(allow=100) as probe:
        _module_step(criterion, x[rows], y[rows])
    return {"seen": probe.seen}


def test_sharded_module_step_with_value_checks_reads_only_the_agreement(tmp_path):
    """The agreement's read of its gathered table is the step's only wait."""
    results = spawn(2, _scenario_sharded_step_reads_only_the_agreement, tmp_path)
    for res in results:
        assert len(res["seen"]) == 1, res["seen"]
        assert "distributed.py" in res["seen"][0] and res["seen"][0].endswith(" in agree"), res["seen"]
