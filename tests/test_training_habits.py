"""The loss in ordinary training code: autocast, eval mode for validation, logits for classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ranks import spawn
from sync_ops import NoHostSync
from torch.utils.checkpoint import checkpoint

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


def _compiled_steps(criterion, eager, batches):
    """Run ``batches`` of ``(x, y)`` through the compiled and the eager module; returns the graphs made."""
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda e, t: criterion(e, t), fullgraph=True, backend=counting_backend)
    for x, y in batches:
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = compiled(xc, y)
        loss.backward()
        expected = eager(xe, y)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        for got, want in ((xc.grad, xe.grad), (criterion.weight.grad, eager.weight.grad)):
            # Rounding of other summation orders: relative to the largest entry.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert torch.equal(criterion.last_class_index, eager.last_class_index)
    return frames


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("check_values", [True, False])
def test_compiles_once_for_every_step(backend, check_values):
    """fullgraph: no graph break; the step is a device buffer, so 20 steps reuse one graph."""
    torch._dynamo.reset()
    x, _, y = _inputs()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, backend=backend, check_values=check_values)
    eager = DualPartialMarginLoss(C, D, class_sample_rate=0.3, backend=backend, check_values=check_values)
    eager.load_state_dict(criterion.state_dict())
    frames = _compiled_steps(criterion, eager, [(x, y)] * 20)
    assert len(frames) == 1, f"compiled {len(frames)} times"
    assert criterion.step == 20


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compiles_once_with_more_rows_than_sampled_classes(backend):
    """The class count then depends on the distinct positives (known on the device only): still
    one graph, whatever the count; and a second one at most when the batch size changes."""
    torch._dynamo.reset()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.1, backend=backend, check_values=False)
    eager = DualPartialMarginLoss(C, D, class_sample_rate=0.1, backend=backend, check_values=False)
    eager.load_state_dict(criterion.state_dict())
    gen = torch.Generator().manual_seed(3)

    def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, D, generator=gen), torch.randint(0, C, (rows,), generator=gen)

    assert len(_compiled_steps(criterion, eager, [batch(B) for _ in range(6)])) == 1
    assert len(_compiled_steps(criterion, eager, [batch(rows) for rows in (5, 8, 13)])) <= 2


_FIRST_USE_COMPILED = """
import torch
from unicom_kernels import dual_partial_margin_loss
x, w, y = torch.randn(9, 16, requires_grad=True), torch.randn(29, 16, requires_grad=True), torch.randint(0, 29, (9,))
step = torch.compile(lambda x, w, y: dual_partial_margin_loss(x, w, y, backend="{backend}"), fullgraph=True,
                     backend="aot_eager")
step(x, w, y).backward()
print("ok", torch.isfinite(w.grad).all().item())
"""


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_functional_form_compiles_as_the_first_call(backend):
    """No eager call first: the backends are imported with the package, not inside the traced call."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_USE_COMPILED.format(backend=backend)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok True" in proc.stdout, proc.stderr[-2000:]


def _scenario_sharded_compiled(rank, world, group):
    x, _, y = _inputs()
    rows = slice(rank * 5, rank * 5 + 5)
    torch._dynamo.reset()
    out = {}
    for check_values in (True, False):
        criterion = DualPartialMarginLoss(C, D, process_group=group, class_sample_rate=0.2, check_values=check_values)
        eager = DualPartialMarginLoss(C, D, process_group=group, class_sample_rate=0.2, check_values=check_values)
        eager.load_state_dict(criterion.state_dict())
        batches = [(x[rows] * (1 + step), y[rows].roll(step)) for step in range(3)]
        out[check_values] = len(_compiled_steps(criterion, eager, batches))
    return out


def test_sharded_module_compiles_into_one_graph(tmp_path):
    """With a process group the compiled module skips the cross-rank agreement (as without
    check_values) and matches the eager module step by step."""
    for out in spawn(2, _scenario_sharded_compiled, tmp_path):
        assert out == {True: 1, False: 1}, out


def test_torch_backend_statistics_refuse_a_second_backward_clearly():
    x, w, y = _inputs()
    w.requires_grad_()
    lse, _ = torch_chunked.lse_and_target(x, w, y, compute_dtype=torch.float32, **KW)
    lse.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through a retained graph needs backend='reference'"):
        lse.sum().backward()


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


# --------------------------------------------------------------------------- activation checkpointing

_RECOMPUTED = "during a backward pass"


def _checkpointed_grads(loss_of, inputs, params, mode):
    """Loss and gradients of ``loss_of(*inputs)`` for ``inputs`` and ``params``, plain or
    inside torch.utils.checkpoint."""
    leaves = [*inputs, *params]
    for leaf in leaves:
        leaf.grad = None
    if mode == "plain":
        loss = loss_of(*inputs)
    else:
        loss = checkpoint(loss_of, *inputs, use_reentrant=mode == "reentrant")
    loss.backward()
    return [loss.detach(), *(leaf.grad for leaf in leaves)]


def _module_under_checkpoint(criterion, mode):
    """A backbone and the module, run as ``mode``: the loss and the gradients of the input,
    the backbone's weight and the prototypes."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D)
    x, _, y = _inputs()
    return _checkpointed_grads(
        lambda x: criterion(backbone(x), y), [x.requires_grad_()], [backbone.weight, criterion.weight], mode
    )


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_drawing_a_sample_refuses_checkpoint_recomputation(mode, backend):
    """The recomputation inside backward would see the advanced step and draw another sample:
    the gradients would be wrong while the loss looked right. It is refused, naming the remedy."""
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, dim_sample_rate=0.5, backend=backend)
    with pytest.raises(RuntimeError, match=f"step of DualPartialMarginLoss {_RECOMPUTED}.*outside the checkpointed"):
        _module_under_checkpoint(criterion, mode)
    # Only the dims are sampled: still a draw.
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=1.0, num_dims=D - 3, backend=backend)
    with pytest.raises(RuntimeError, match=_RECOMPUTED):
        _module_under_checkpoint(criterion, mode)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("training", [True, False], ids=["nothing_sampled", "eval"])
def test_module_without_a_draw_is_exact_under_checkpoint(mode, training):
    """Nothing sampled (every class and dim, or eval mode): the recomputation is the forward."""
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=1.0, dim_sample_rate=1.0, backend="torch")
    criterion.train(training)
    want = _module_under_checkpoint(criterion, "plain")
    got = _module_under_checkpoint(criterion, mode)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_functional_form_under_checkpoint(mode):
    """generator=None draws from the global RNG, which checkpointing restores: exact. An explicit
    generator has advanced by the recomputation: refused. Explicit indices draw nothing: exact."""
    x, w, y = _inputs()
    inputs = [x.requires_grad_(), w.requires_grad_()]
    kw = dict(class_sample_rate=0.3, dim_sample_rate=0.5, backend="torch", **KW)

    def global_rng(x, w):
        return dual_partial_margin_loss(x, w, y, **kw)

    torch.manual_seed(3)
    want = _checkpointed_grads(global_rng, inputs, [], "plain")
    torch.manual_seed(3)
    got = _checkpointed_grads(global_rng, inputs, [], mode)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)

    generator = torch.Generator().manual_seed(5)
    with pytest.raises(RuntimeError, match=f"generator of dual_partial_margin_loss {_RECOMPUTED}.*generator=None"):
        _checkpointed_grads(lambda x, w: dual_partial_margin_loss(x, w, y, generator=generator, **kw), inputs, [], mode)

    def explicit(x, w):
        indices = dict(class_index=torch.unique(torch.cat([y, torch.arange(0, C, 4)])), dim_index=torch.arange(1, D, 2))
        return dual_partial_margin_loss(x, w, y, generator=generator, **indices, **kw)

    want = _checkpointed_grads(explicit, inputs, [], "plain")
    got = _checkpointed_grads(explicit, inputs, [], mode)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_compiled_checkpoint_around_the_module_is_refused():
    """torch.compile runs a checkpointed region holding the module eagerly (the module sets
    attributes), so the recomputation is refused as in eager mode, not silently wrong."""
    torch._dynamo.reset()
    criterion = DualPartialMarginLoss(C, D, class_sample_rate=0.3, backend="torch")
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D)
    x, _, y = _inputs()
    compiled = torch.compile(lambda x: checkpoint(lambda x: criterion(backbone(x), y), x, use_reentrant=False))
    with pytest.raises(RuntimeError, match=_RECOMPUTED):
        compiled(x.requires_grad_()).backward()
