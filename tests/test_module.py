"""DualPartialMarginLoss as a module: parameters, gradients, dtypes, training."""

import pytest
import torch

from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss
from unicom_kernels.ops import resolve_backend


def _batch(num_classes=300, batch=19, dim=24, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).to(dtype).requires_grad_()
    return x, torch.randint(0, num_classes, (batch,), generator=gen)


def test_prototypes_parameter():
    torch.manual_seed(0)
    crit = DualPartialMarginLoss(5000, 64)
    assert crit.weight.shape == (5000, 64) and crit.weight.dtype == torch.float32
    assert crit.weight.requires_grad
    assert abs(crit.weight.std().item() - 0.01) < 5e-4 and abs(crit.weight.mean().item()) < 5e-4


def test_auto_backend_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradient_only_on_sampled_rows_and_dims(backend):
    x, y = _batch()
    crit = DualPartialMarginLoss(300, 24, class_sample_rate=0.1, dim_sample_rate=0.5, backend=backend)
    crit(x, y).backward()
    grad = crit.weight.grad
    rows = torch.zeros(300, dtype=torch.bool)
    rows[crit.last_class_index] = True
    cols = torch.zeros(24, dtype=torch.bool)
    cols[crit.last_dim_index] = True
    assert grad[~rows].abs().max() == 0 and grad[:, ~cols].abs().max() == 0
    assert (grad[rows][:, cols].abs().sum(1) > 0).all()
    assert x.grad[:, ~cols].abs().max() == 0 and (x.grad[:, cols].abs().sum(1) > 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("rate", [0.1, 0.001])
def test_all_ignored_gives_zero_loss_and_grads(backend, rate):
    x, y = _batch()
    crit = DualPartialMarginLoss(300, 24, class_sample_rate=rate, backend=backend)
    loss = crit(x, torch.full_like(y, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(crit.weight.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x, y = _batch(dtype=dtype)
    crit = DualPartialMarginLoss(300, 24).to(torch.float64 if dtype == torch.float64 else torch.float32)
    loss = crit(x, y)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == dtype and crit.weight.grad.dtype == crit.weight.dtype
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_custom_ignore_index():
    x, y = _batch()
    y2 = y.clone()
    y2[:5] = 999
    kw = dict(class_index=torch.arange(300), backend="torch")
    a = dual_partial_margin_loss(x[5:], torch.randn(300, 24, generator=torch.Generator().manual_seed(1)), y[5:], **kw)
    b = dual_partial_margin_loss(
        x, torch.randn(300, 24, generator=torch.Generator().manual_seed(1)), y2, ignore_index=999, **kw
    )
    torch.testing.assert_close(a, b)


def test_no_grad_forward_matches():
    x, y = _batch()
    crit = DualPartialMarginLoss(300, 24).eval()
    loss = crit(x, y)
    with torch.no_grad():
        assert torch.equal(crit(x, y), loss.detach())


def test_training_lowers_loss():
    """A linear embedding on separable data: a few Adam steps reduce the loss."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(50, 16, generator=gen)
    y = torch.randint(0, 50, (256,), generator=gen)
    data = centres[y] + 0.3 * torch.randn(256, 16, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 32)
    crit = DualPartialMarginLoss(50, 32, class_sample_rate=0.5, dim_sample_rate=0.75)
    opt = torch.optim.Adam([*model.parameters(), *crit.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        loss = crit(model(data), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
