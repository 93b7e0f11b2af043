"""Bad input gets a clear exception naming the argument, before any computation (docs/design.md, section 6)."""

import math

import pytest
import torch

import unicom_kernels.loss as loss_module
from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss

B, C, D = 6, 20, 8


@pytest.fixture(autouse=True)
def no_backend_call(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a backend was reached before the input was rejected")

    monkeypatch.setattr(loss_module, "get_backend", fail)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=gen), torch.randn(C, D, generator=gen), torch.randint(0, C, (B,), generator=gen)


def _bad_tensor_cases():
    x, w, y = _inputs()
    nan_x = x.clone()
    nan_x[2, 3] = math.nan
    inf_x = x.clone()
    inf_x[0, 0] = math.inf
    y_high, y_neg = y.clone(), y.clone()
    y_high[1] = C
    y_neg[1] = -2
    return [
        ("embeddings", TypeError, dict(embeddings=x.long())),
        ("embeddings", TypeError, dict(embeddings=x.numpy())),
        ("embeddings", ValueError, dict(embeddings=x[0])),
        ("embeddings", ValueError, dict(embeddings=x[:0], labels=y[:0])),
        ("embeddings", ValueError, dict(embeddings=nan_x)),
        ("embeddings", ValueError, dict(embeddings=inf_x)),
        ("prototypes", TypeError, dict(prototypes=w.int())),
        ("prototypes", ValueError, dict(prototypes=w[:, :5])),
        ("prototypes", ValueError, dict(prototypes=w.unsqueeze(0))),
        ("labels", TypeError, dict(labels=y.float())),
        ("labels", TypeError, dict(labels=y > 3)),
        ("labels", ValueError, dict(labels=y[:4])),
        ("labels", ValueError, dict(labels=y.view(2, 3))),
        ("labels", ValueError, dict(labels=y_high)),
        ("labels", ValueError, dict(labels=y_neg)),
        ("device", ValueError, dict(prototypes=w.to("meta"))),
        ("class_index", ValueError, dict(class_index=torch.tensor([0, 1]))),
        ("class_index", ValueError, dict(class_index=torch.tensor([0, 0, *range(C)]))),
        ("class_index", ValueError, dict(class_index=torch.tensor([C]))),
        ("class_index", TypeError, dict(class_index=torch.arange(C).float())),
        ("class_index", ValueError, dict(class_index=torch.arange(C)[None])),
        ("dim_index", ValueError, dict(dim_index=torch.tensor([D]))),
        ("dim_index", ValueError, dict(dim_index=torch.tensor([1, 1]))),
        ("dim_index", ValueError, dict(dim_index=torch.tensor([], dtype=torch.int64))),
        ("backend", ValueError, dict(backend="triton", embeddings=x.double(), prototypes=w.double())),
    ]


@pytest.mark.parametrize("name,error,override", _bad_tensor_cases())
def test_bad_tensors(name, error, override):
    x, w, y = _inputs()
    args = dict(embeddings=x, prototypes=w, labels=y) | override
    with pytest.raises(error, match=name):
        dual_partial_margin_loss(args.pop("embeddings"), args.pop("prototypes"), args.pop("labels"), **args)


BAD_OPTIONS = [
    ("scale", ValueError, dict(scale=0.0)),
    ("scale", ValueError, dict(scale=-1.0)),
    ("scale", TypeError, dict(scale=math.inf)),
    ("scale", TypeError, dict(scale="32")),
    ("margin", TypeError, dict(margin=math.nan)),
    ("margin", ValueError, dict(margin=28.6)),  # degrees, as pytorch-metric-learning takes them
    ("margin", ValueError, dict(margin=-1.6)),
    ("margin", ValueError, dict(margin=1.0, margin_type="cosface")),
    ("margin_type", ValueError, dict(margin_type="sphereface")),
    ("margin_grad", ValueError, dict(margin_grad="approx")),
    ("class_sample_rate", ValueError, dict(class_sample_rate=0.0)),
    ("class_sample_rate", ValueError, dict(class_sample_rate=1.5)),
    ("dim_sample_rate", ValueError, dict(dim_sample_rate=-0.1)),
    ("dim_sample_rate", ValueError, dict(dim_sample_rate=1.01)),
    ("dim_sample_rate", ValueError, dict(dim_sample_rate=0.01)),  # round(0.08) = 0 dims
    ("num_dims", ValueError, dict(num_dims=0)),
    ("num_dims", ValueError, dict(num_dims=D + 1)),
    ("num_dims", TypeError, dict(num_dims=2.5)),
    ("ignore_index", TypeError, dict(ignore_index=None)),
    ("backend", ValueError, dict(backend="cuda")),
    ("backend", ValueError, dict(backend="tpu")),
]


@pytest.mark.parametrize("name,error,override", BAD_OPTIONS)
def test_bad_options(name, error, override):
    x, w, y = _inputs()
    with pytest.raises(error, match=name):
        dual_partial_margin_loss(x, w, y, **override)


@pytest.mark.parametrize(
    "name,error,override",
    BAD_OPTIONS
    + [
        ("num_classes", ValueError, dict(num_classes=0)),
        ("embedding_dim", ValueError, dict(embedding_dim=-3)),
        ("seed", TypeError, dict(seed=1.5)),
    ],
)
def test_bad_module_options(name, error, override):
    args = dict(num_classes=C, embedding_dim=D) | override
    with pytest.raises(error, match=name):
        DualPartialMarginLoss(**args)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        dual_partial_margin_loss(x, w, y, backend="triton")


def test_module_rejects_bad_call():
    crit = DualPartialMarginLoss(C, D)
    x, _, y = _inputs()
    with pytest.raises(ValueError, match="prototypes"):
        crit(x[:, :5], y)
    with pytest.raises(ValueError, match="labels"):
        crit(x, torch.full((B,), C))
    assert crit.step == 0
