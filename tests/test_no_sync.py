"""A training step queues on the device without waiting for it: no op reads a device value back.

On this CPU-only suite :class:`NoHostSync` stands in for ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

from unicom_kernels import reference
from unicom_kernels.ops import mean_loss, torch_chunked

try:
    from tests.sync_ops import NoHostSync
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from sync_ops import NoHostSync  # type: ignore[no-redef]

_X = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.25])
_COUNTS = torch.tensor([1, 2, 0])
_INDEX = torch.tensor([0, 2])


def _branch_on_tensor() -> None:
    if _X.any():
        pass


SYNCING = {
    "mask index": (lambda: _X[_X > 0], "aten.index"),
    "mask index_put": (lambda: _X.clone().index_put_((_X > 0,), _X[:2] * 0), "aten.index_put_"),
    "nonzero": (lambda: _X.nonzero(), "aten.nonzero"),
    "unique": (lambda: _X.unique(), "aten._unique2"),
    "unique_consecutive": (lambda: torch.unique_consecutive(_COUNTS), "aten.unique_consecutive"),
    "masked_select": (lambda: _X.masked_select(_X > 0), "aten.masked_select"),
    "item": (lambda: _X[0].item(), "aten._local_scalar_dense"),
    "tolist": (lambda: _X.tolist(), "Tensor.tolist"),
    "if tensor": (_branch_on_tensor, "aten._local_scalar_dense"),
    "int": (lambda: int(_COUNTS[1]), "aten._local_scalar_dense"),
    "repeat_interleave": (lambda: torch.repeat_interleave(_COUNTS), "aten.repeat_interleave"),
    "equal": (lambda: torch.equal(_X, _X), "aten.equal"),
    "bincount": (lambda: torch.bincount(_COUNTS), "aten.bincount"),
}

NOT_SYNCING = {
    "matmul": lambda: torch.ones(3, 4) @ torch.ones(4, 2),
    "where": lambda: torch.where(_X > 0, _X, 0.0),
    "scatter": lambda: _X.scatter(0, _INDEX, 1.0),
    "gather": lambda: _X.gather(0, _INDEX),
    "topk": lambda: _X.topk(2),
    "sort": lambda: _X.sort(),
    "searchsorted": lambda: torch.searchsorted(_X.sort().values, _X),
    "index_select": lambda: _X.index_select(0, _INDEX),
    "int64 index": lambda: _X[_INDEX],
    "mask fill with a scalar": lambda: _X.clone().__setitem__(_X > 0, 0.0),
    "nonzero_static": lambda: torch.nonzero_static(_X, size=5),
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(_X[:3], _COUNTS, output_size=3),
    "assert_async": lambda: torch._assert_async(_X[0] > 0),
}


@pytest.mark.parametrize("case", SYNCING)
def test_mode_catches(case):
    op, name = SYNCING[case]
    with pytest.raises(AssertionError, match=f"{name} would synchronise") as info, NoHostSync():
        op()
    assert __file__ in str(info.value)  # the calling line is named


@pytest.mark.parametrize("case", NOT_SYNCING)
def test_mode_lets_through(case):
    with NoHostSync():
        NOT_SYNCING[case]()


def _problem(dtype: torch.dtype, targets: list[int]):
    gen = torch.Generator().manual_seed(0)
    rows, cols, dim = len(targets), 11, 8
    x = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(cols, dim, generator=gen).to(dtype).requires_grad_()
    return x, w, torch.tensor(targets)


# Ignored / target-less rows (-1), a duplicated class (4), the last column; then no target at all.
TARGETS = {"mixed": [4, -1, 4, 10, 0, -1, 7], "none": [-1, -1, -1]}


def _step(backend, entry: str, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, **kwargs) -> None:
    """Forward and backward of one entry point, as a training step runs it."""
    if entry == "margin_softmax_loss":
        loss = mean_loss(backend, x, w, target, **kwargs)
    else:
        lse, z_t = backend.lse_and_target(x, w, target, **kwargs)
        loss = (lse - 2 * z_t).sum()
    loss.backward()


@pytest.fixture
def as_on_cuda(monkeypatch):
    """The torch backend takes its accelerator path (reading a value is not free), in 3-row chunks."""
    monkeypatch.setattr(torch_chunked, "_host_reads_are_free", lambda device: False)
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 3 * 11)


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entry", ["margin_softmax_loss", "lse_and_target"])
def test_torch_backend_step_never_waits(entry, dtype, margin_type, margin_grad, targets, as_on_cuda):
    kwargs = {"scale": 64.0, "margin": 0.5, "margin_type": margin_type, "margin_grad": margin_grad}
    x, w, target = _problem(dtype, TARGETS[targets])
    with NoHostSync():
        _step(torch_chunked, entry, x, w, target, **kwargs, compute_dtype=dtype)
    expected_x, expected_w = x.grad, w.grad
    x.grad = w.grad = None
    _step(torch_chunked, entry, x, w, target, **kwargs, compute_dtype=dtype)  # outside the mode: the same
    assert torch.equal(x.grad, expected_x) and torch.equal(w.grad, expected_w)
    assert torch.isfinite(expected_x).all() and torch.isfinite(expected_w).all()


def test_cpu_fast_path_reads_grad_out():
    """Control: unpatched, the backward reads grad_out on the CPU, and the mode sees it."""
    x, w, target = _problem(torch.float32, TARGETS["mixed"])
    kwargs = {"scale": 64.0, "margin": 0.5, "margin_type": "arcface", "margin_grad": "exact"}
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoHostSync():
        _step(torch_chunked, "margin_softmax_loss", x, w, target, **kwargs, compute_dtype=torch.float32)


@pytest.mark.parametrize("on_cuda", [False, True], ids=["cpu", "cuda-path"])
@pytest.mark.parametrize("grad_out", [1.0, 2.0])
def test_retained_graph_backward_twice(grad_out, on_cuda, monkeypatch):
    """The saved gradient buffers are handed over or multiplied, never scaled in place."""
    if on_cuda:
        monkeypatch.setattr(torch_chunked, "_host_reads_are_free", lambda device: False)
    x, w, target = _problem(torch.float32, TARGETS["mixed"])
    kwargs = {"scale": 64.0, "margin": 0.5, "margin_type": "arcface", "margin_grad": "exact"}
    loss = grad_out * torch_chunked.margin_softmax_loss(x, w, target, **kwargs, compute_dtype=torch.float32)
    loss.backward(retain_graph=True)
    once_x, once_w = x.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once_x, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, 2 * once_w, rtol=0, atol=0)


def test_retained_graph_gradients_are_new_tensors():
    """A second ``autograd.grad`` through a retained graph returns new tensors, not the buffer the
    first one was handed; editing that first gradient in place then gives a clear error."""
    x, w, target = _problem(torch.float32, TARGETS["mixed"])
    kwargs = {"scale": 64.0, "margin": 0.5, "margin_type": "arcface", "margin_grad": "exact"}
    loss = torch_chunked.margin_softmax_loss(x, w, target, **kwargs, compute_dtype=torch.float32)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    kept = first.clone()
    second = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert second is not first and second.data_ptr() != first.data_ptr()
    second.mul_(10.0)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    first.zero_()  # e.g. clipping the returned gradient in place
    with pytest.raises(RuntimeError, match="backend='torch' returned its gradient buffers"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("entry", ["margin_softmax_loss", "lse_and_target"])
def test_reference_backend_step_never_waits(entry):
    kwargs = {"scale": 64.0, "margin": 0.5, "margin_type": "arcface", "margin_grad": "exact"}
    x, w, target = _problem(torch.float32, TARGETS["mixed"])
    with NoHostSync():
        _step(reference, entry, x, w, target, **kwargs, compute_dtype=torch.float32)
