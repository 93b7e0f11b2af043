"""Argument validation (docs/design.md, section 6).

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, device or value) naming the argument, before any computation.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from .margin import MARGIN_GRADS, MARGIN_TYPES

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# The dtypes the backends compute in; others (float8, ...) are refused rather than half-supported.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Largest sensible |margin|: beyond it even a perfectly aligned sample's target logit is <= 0,
# which means a unit slip (degrees, as pytorch-metric-learning takes them) rather than a setting.
MARGIN_LIMITS = {"arcface": math.pi / 2, "cosface": 1.0}


class NonFiniteError(ValueError, FloatingPointError):
    """The embeddings hold NaN or inf: a ``ValueError`` like every refused input, and a
    ``FloatingPointError``, so a training loop can tell a diverged model from a wrong call."""


def check_positive_int(value: object, name: str) -> int:
    """``value`` as a plain ``int`` (numpy integers accepted), checked to be >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """``value``, checked to be a ``bool`` (a truthy ``None`` or string is a slip, not a setting)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_seed(value: object) -> int:
    """The module's ``seed`` as a plain ``int`` (numpy integers accepted), checked to fit in int64.

    The sampler hashes the seed's 64 bits, so a wider range would give some seeds the draws of others.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int, got {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(
            f"seed must fit in int64 ([-2**63, 2**63 - 1]; the sampler uses 64 bits, a wider seed would repeat "
            f"the draws of another), got {value}"
        )
    return int(value)


def check_process_group(value: object) -> None:
    """``process_group``: ``None`` or a ``torch.distributed.ProcessGroup``, checked before any collective."""
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if value is not None and (group_type is None or not isinstance(value, group_type)):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (such as dist.group.WORLD after "
            f"init_process_group) or None, got {type(value).__name__}"
        )


def check_generator(value: object) -> None:
    """The samplers' ``generator``: ``None`` or a ``torch.Generator``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__}")


def check_outside_backward(source: str, remedy: str) -> None:
    """Refuse to draw a sample from ``source`` while autograd runs a backward pass.

    Activation checkpointing (``torch.utils.checkpoint``, either mode) recomputes its region
    inside backward. By then ``source`` (the module's step, an explicit generator) has moved
    on, so the recomputation would draw other classes and dims than the forward used and
    every gradient would be silently wrong. Compiled code is not checked (see the user guide).
    """
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            f"the loss was asked to draw classes and dims from {source} during a backward pass, as "
            f"activation checkpointing does when it recomputes a region holding the loss; that source has "
            f"advanced since the forward, so the recomputed loss would use another sample and the gradients "
            f"would be silently wrong: {remedy}"
        )


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_integer_tensor(value: object, name: str) -> Tensor:
    t = _check_tensor(value, name)
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor (int64), got dtype {t.dtype}")
    return t


def _check_float_tensor(value: object, name: str) -> Tensor:
    t = _check_tensor(value, name)
    if t.dtype not in FLOAT_DTYPES:
        supported = ", ".join(map(str, FLOAT_DTYPES))
        raise TypeError(f"{name} must be a floating-point tensor of dtype {supported}; got dtype {t.dtype}")
    return t


def _as_int64(t: Tensor, avoid: int = _INT64_MAX) -> Tensor:
    """Integer ``t`` as int64, compared as numbers afterwards.

    ``.to(int64)`` is exact for every integer dtype but uint64, whose values of ``2**63`` and
    above it wraps to negative numbers (``2**64 - 1`` to ``-1``, the default ``ignore_index``).
    Those become ``2**63 - 1`` (``2**63 - 2`` when that is ``avoid``): too large for any class
    count or dimension, like the values themselves. Torch has no uint64 comparisons on the CPU,
    so the wrap is found from the int64 bits. Nothing is read back from the device.
    """
    t64 = t.to(torch.int64)
    if t.dtype == torch.uint64:
        t64 = torch.where(t64 < 0, _INT64_MAX if avoid != _INT64_MAX else _INT64_MAX - 1, t64)
    return t64


def _value_at(t: Tensor, mask: Tensor) -> int:
    """The first entry of integer ``t`` where ``mask`` holds, as a Python int (uint64 unwrapped)."""
    value = t.to(torch.int64)[mask][0].item()
    return value + 2**64 if t.dtype == torch.uint64 and value < 0 else value


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_rate(value: object, name: str) -> float:
    rate = _check_real(value, name)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return rate


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_options(
    *,
    scale: object,
    margin: object,
    margin_type: object,
    margin_grad: object,
    class_sample_rate: object,
    dim_sample_rate: object,
    num_dims: object,
    ignore_index: object,
    backend: object,
    backends: tuple[str, ...],
) -> None:
    """Check the scalar options of the loss (no tensors involved)."""
    if _check_real(scale, "scale") <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    _check_real(margin, "margin")
    _check_choice(margin_type, "margin_type", MARGIN_TYPES)
    limit = MARGIN_LIMITS.get(margin_type)
    if limit is not None and not abs(margin) < limit:
        unit = "radians (0.5 rad = 28.6 degrees)" if margin_type == "arcface" else "cosine units"
        raise ValueError(
            f"margin of margin_type={margin_type!r} must lie in (-{limit:.4g}, {limit:.4g}), in {unit}; got {margin!r}"
        )
    _check_choice(margin_grad, "margin_grad", MARGIN_GRADS)
    _check_rate(class_sample_rate, "class_sample_rate")
    _check_rate(dim_sample_rate, "dim_sample_rate")
    if num_dims is not None and (isinstance(num_dims, bool) or not isinstance(num_dims, numbers.Integral)):
        raise TypeError(f"num_dims must be an int or None, got {num_dims!r}")
    if num_dims is not None and num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (labels are compared as int64), got {ignore_index}")
    _check_choice(backend, "backend", backends)


def num_selected_dims(dim: int, dim_sample_rate: float, num_dims: int | None) -> int:
    """``k = num_dims`` or ``round(dim_sample_rate * dim)``, checked to lie in ``[1, dim]``."""
    if num_dims is not None:
        if num_dims > dim:
            raise ValueError(f"num_dims must be <= the embedding dim {dim}, got {num_dims}")
        return int(num_dims)
    k = round(dim_sample_rate * dim)
    if k < 1:
        raise ValueError(
            f"dim_sample_rate={dim_sample_rate} selects round({dim_sample_rate} * {dim}) = 0 dims; it must select >= 1"
        )
    return k


def check_embeddings(embeddings: object, prototypes: object) -> tuple[Tensor, Tensor]:
    """Check the types, shapes and devices of ``embeddings [B, D]`` and ``prototypes [C, D]``."""
    x = _check_float_tensor(embeddings, "embeddings")
    w = _check_float_tensor(prototypes, "prototypes")
    if x.dim() != 2:
        raise ValueError(f"embeddings must have shape [B, D], got {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"prototypes must have shape [C, D], got {tuple(w.shape)}")
    if x.shape[0] == 0:
        raise ValueError("embeddings is an empty batch (B = 0); the loss needs at least one row")
    if x.shape[1] == 0 or w.shape[0] == 0:
        raise ValueError(f"embeddings [B, D] and prototypes [C, D] need D >= 1 and C >= 1, got {tuple(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"embeddings [B, D] and prototypes [C, D] must agree on D, got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if w.device != x.device:
        raise ValueError(f"embeddings and prototypes must be on one device, got {x.device} and {w.device}")
    return x, w


def check_inputs(
    embeddings: object,
    prototypes: object,
    labels: object,
    *,
    ignore_index: int,
    check_values: bool,
) -> Tensor:
    """Check types, shapes and devices, and with ``check_values`` that the labels lie in
    ``[0, prototypes.shape[0])`` (or equal ``ignore_index``) and the embeddings are finite.
    Returns the labels as int64.

    Labels of any integer dtype are widened to int64 first, so that ``ignore_index`` and the
    class range are compared as numbers (in uint8, ``-1`` would wrap to 255: class 255); uint64
    labels beyond int64 stay out of range instead of wrapping (:func:`_as_int64`), also for the
    cross-rank range check of a process group.
    The value checks read one value back from the device (a host synchronisation on a GPU);
    the rest looks at shapes and dtypes only.
    """
    x, w = check_embeddings(embeddings, prototypes)
    y = _check_integer_tensor(labels, "labels")
    if y.dim() != 1:
        raise ValueError(f"labels must have shape [B], got {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have one entry per embedding row ({x.shape[0]}), got {y.shape[0]}")
    if y.device != x.device:
        raise ValueError(
            f"embeddings, prototypes and labels must be on one device, got {x.device}, {w.device}, {y.device}"
        )
    y64 = _as_int64(y, avoid=ignore_index)
    # A graph being compiled cannot raise from device values (a device-side assert would end
    # the process): there the value checks are left to the eager calls.
    if check_values and not torch.compiler.is_compiling():
        num_classes = w.shape[0]
        bad = (y64 != ignore_index) & ((y64 < 0) | (y64 >= num_classes))
        labels_bad, nonfinite = torch.stack([bad.any(), ~torch.isfinite(x).all()]).tolist()  # the one read back
        if labels_bad:
            raise ValueError(
                f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {_value_at(y, bad)}"
            )
        if nonfinite:
            raise NonFiniteError("embeddings contain NaN or inf (pass check_values=False to skip the value checks)")
    return y64


def _check_index(index: object, name: str, low: int, high: int, what: str, device: torch.device) -> Tensor:
    t = _check_integer_tensor(index, name)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of {what}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the embeddings, got {t.device}")
    t = _as_int64(t)  # torch has no comparisons of uint16/32/64 on the CPU
    if ((t < low) | (t >= high)).any():
        raise ValueError(f"{name} must hold {what} in [{low}, {high})")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{name} must not repeat an index")
    return t.sort().values


def check_class_index(class_index: object, positives: Tensor, start: int, stop: int) -> Tensor:
    """Validate explicit global class ids (this rank's block is ``[start, stop)``) against the
    local ``positives`` (labels shifted into the block, ``-1`` for none); returns the sorted
    local ids (``class_index - start``)."""
    index = _check_index(class_index, "class_index", start, stop, "class ids", positives.device) - start
    missing = positives[(positives >= 0) & ~torch.isin(positives, index)]
    if missing.numel():
        raise ValueError(
            f"class_index must contain every label of the batch; label {missing[0].item() + start} is missing"
        )
    return index


def check_dim_index(dim_index: object, dim: int, device: torch.device) -> Tensor:
    """Validate an explicit dimension selection; returns it sorted (int64)."""
    return _check_index(dim_index, "dim_index", 0, dim, "feature dims", device)
