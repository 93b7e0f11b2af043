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


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_nonfinite_embeddings_are_also_a_floating_point_error(value):
    """A training loop catches FloatingPointError to tell a diverged model from a wrong call."""
    x, w, y = _inputs()
    x[1, 2] = value
    with pytest.raises(FloatingPointError, match="embeddings contain NaN or inf") as err:
        dual_partial_margin_loss(x, w, y)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError) as err:  # a wrong call is not one
        dual_partial_margin_loss(x[:, :5], w, y)
    assert not isinstance(err.value, FloatingPointError)


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


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, C])
def test_uint64_labels_are_compared_as_numbers(value):
    # .to(int64) wraps 2**64 - 1 to -1, the ignore_index: the row would be dropped silently.
    x, w, y = _inputs()
    labels = y.to(torch.uint64)
    labels[2] = value
    with pytest.raises(ValueError, match=f"labels must be in \\[0, {C}\\).*; found {value}$"):
        dual_partial_margin_loss(x, w, labels)
    with pytest.raises(ValueError, match=f"found {value}$"):
        DualPartialMarginLoss(C, D)(x, labels)


def test_uint64_labels_beyond_int64_stay_out_of_range():
    # Without check_values (or for the cross-rank range check) the labels go on as int64:
    # a uint64 label beyond int64 must not become the ignore_index, even an ignore_index of 2**63 - 1.
    from unicom_kernels._checks import check_inputs

    x, w, y = _inputs()
    labels = y.to(torch.uint64)
    labels[:2] = 2**64 - 1
    for ignore_index in (-1, 2**63 - 1):
        out = check_inputs(x, w, labels, ignore_index=ignore_index, check_values=False)
        assert out.dtype == torch.int64 and torch.equal(out[2:], y[2:])
        assert (out[:2] >= C).all() and (out[:2] != ignore_index).all()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_indices_are_checked(dtype):
    # torch has no uint16/32/64 comparisons on the CPU: the check must not end in a NotImplementedError.
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="dim_index"):
        dual_partial_margin_loss(x, w, y, dim_index=torch.tensor([0, D]).to(dtype))
    with pytest.raises(ValueError, match="class_index"):
        dual_partial_margin_loss(x, w, y, class_index=torch.tensor([*range(C - 1), 2**64 - 1], dtype=torch.uint64))


def test_unsigned_indices_are_accepted(monkeypatch):
    monkeypatch.setattr(loss_module, "get_backend", lambda *args: None)  # selection only, then stop
    monkeypatch.setattr(loss_module, "mean_loss", lambda *args, **kwargs: (args[1], args[2]))
    x, w, y = _inputs()
    dims = torch.tensor([5, 1, 3], dtype=torch.uint32)
    x_sel, w_sel = dual_partial_margin_loss(x, w, y, dim_index=dims, class_index=torch.arange(C).to(torch.uint16))
    assert torch.equal(x_sel, x[:, [1, 3, 5]]) and torch.equal(w_sel, w[:, [1, 3, 5]])


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("name", ["embeddings", "prototypes"])
@pytest.mark.parametrize("check_values", [True, False])
def test_float8_is_refused(dtype, name, check_values):
    # Not in the supported list: isfinite is missing for float8_e4m3fn, and with check_values=False
    # (or as prototypes) both ran without complaint.
    x, w, y = _inputs()
    tensors = dict(embeddings=x, prototypes=w)
    tensors[name] = tensors[name].to(dtype)
    pattern = f"{name} must be .*torch.float32, torch.float16, torch.bfloat16, torch.float64; got dtype {dtype}"
    with pytest.raises(TypeError, match=pattern):
        dual_partial_margin_loss(tensors["embeddings"], tensors["prototypes"], y, check_values=check_values)
    if name == "embeddings":
        crit = DualPartialMarginLoss(C, D, check_values=check_values)
        with pytest.raises(TypeError, match=pattern):
            crit(x.to(dtype), y)
        with pytest.raises(TypeError, match=pattern):
            crit.logits(x.to(dtype))


@pytest.mark.parametrize("value", [None, "no", 0, 1.0])
def test_check_values_must_be_a_bool(value):
    x, w, y = _inputs()
    with pytest.raises(TypeError, match="check_values must be a bool"):
        dual_partial_margin_loss(x, w, y, check_values=value)
    with pytest.raises(TypeError, match="check_values must be a bool"):
        DualPartialMarginLoss(C, D, check_values=value)


@pytest.mark.parametrize("value", ["world", 0, object()])
def test_process_group_must_be_a_process_group(value, monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective was reached before process_group was rejected")

    monkeypatch.setattr(loss_module._dist, "agree", no_collective)
    x, w, y = _inputs()
    pattern = "process_group must be a torch.distributed.ProcessGroup"
    with pytest.raises(TypeError, match=pattern):
        dual_partial_margin_loss(x, w, y, process_group=value)
    with pytest.raises(TypeError, match=pattern):
        dual_partial_margin_loss(x, w, y, process_group=value, margin_type="sphereface")  # bad options too
    with pytest.raises(TypeError, match=pattern):
        DualPartialMarginLoss(C, D, process_group=value)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seed_must_fit_in_int64(seed):
    # The sampler hashes 64 bits of the seed: a seed of 2**64 would draw exactly like seed 0.
    with pytest.raises(ValueError, match="seed must fit in int64"):
        DualPartialMarginLoss(C, D, seed=seed)


@pytest.mark.parametrize("seed", [True, "0", None])
def test_seed_must_be_an_int(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        DualPartialMarginLoss(C, D, seed=seed)


def test_seeds_at_the_int64_limits_are_accepted():
    for seed in (-(2**63), -1, 0, 2**63 - 1):
        assert DualPartialMarginLoss(C, D, seed=seed).seed == seed
