"""Dual partial selection: which classes and which feature dimensions take part in a step.

Both samplers rank random integer keys: the classes keep the highest-keyed negatives beside
every positive, the dims the highest-keyed ones. The keys come from one of two sources:

- :func:`step_keys`, a counter-based hash of ``(seed, step, stream, index)`` in int64 tensor
  arithmetic on ``step``'s device. The module uses it: with ``step`` a device tensor advanced in
  place, a step needs no generator and reads nothing back from the device, compiles into one
  graph and replays in a CUDA graph, and every rank and device type draws the same keys.
- :func:`generator_keys`, drawn from a ``torch.Generator`` (the functional form's ``generator``).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# Random keys lie in [0, 2^62); a positive class gets 2^62, above every random key.
_KEY_RANGE = 1 << 62


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch holds for it."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64, as in C)."""
    x = (x ^ _shift_right(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right(x, 31)


def step_keys(seed: int, step: Tensor, stream: int, n: int) -> Tensor:
    """``[n]`` int64 keys in ``[0, 2^62)``, a hash of ``(seed, step, stream, index)``.

    Args:
        seed, stream: Python ints; streams keep draws of one step independent (classes of
            each rank, dims).
        step: 0-dim int64 tensor; the keys live on its device.

    Well mixed (neighbouring steps, seeds or indices give unrelated keys) and exact integer
    arithmetic, so identical on every device.
    """
    base = _signed(_splitmix64(_splitmix64(seed & _MASK64) ^ (stream & _MASK64)))
    x = _mix((step.to(torch.int64) + base) * _signed(_GOLDEN))
    # Two finaliser rounds over x ^ index (not x + index * constant: inductor miscompiles the
    # overflowing product of an arange on the CPU).
    index = torch.arange(n, device=step.device, dtype=torch.int64)
    return _shift_right(_mix(_mix(x ^ index)), 2)


def generator_keys(n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """``[n]`` int64 keys in ``[0, 2^62)`` drawn on ``generator``'s device (else ``device``),
    returned on ``device``."""
    draw_device = torch.device(device) if generator is None else generator.device
    return torch.randint(0, _KEY_RANGE, (n,), generator=generator, device=draw_device).to(device)


def sample_classes(positives: Tensor, keys: Tensor, rate: float) -> Tensor:
    """Sorted class indices: every positive plus the highest-keyed negatives.

    Args:
        positives: ``[P]`` int64 labels of the batch in ``[0, C)``, any order, repeats allowed;
            ``-1`` entries (ignored rows, or classes of another rank's block) count for nothing.
        keys: ``[C]`` random int64 keys in ``[0, 2^62)`` (:func:`step_keys`, :func:`generator_keys`),
            on ``positives.device``: top-n of uniform keys is a uniform draw without replacement.
        rate: ``class_sample_rate`` in ``(0, 1]``.

    Returns:
        ``[n]`` int64, sorted and distinct (the indices of one top-k), ``n = max(distinct
        positives, int(rate * C), 1)`` (at least one class, so a block without positives still
        has a log-sum-exp). When ``P <= max(int(rate *
        C), 1)`` (as many sampled classes as rows, or more), ``n`` is known without counting the
        distinct positives: nothing is read back from the device.
    """
    num_classes = keys.numel()
    # Slot C takes the -1 entries, so that no mask (a data-dependent shape) is needed.
    scores = torch.cat([keys, keys.new_zeros(1)])
    scores.index_fill_(0, torch.where(positives >= 0, positives, num_classes), _KEY_RANGE)
    scores = scores[:num_classes]
    n = max(int(rate * num_classes), 1)
    if positives.numel() > n:  # more rows than the rate's classes: count the distinct positives (one read)
        n = max(n, int((scores == _KEY_RANGE).sum()))
    return torch.topk(scores, n, sorted=False).indices.sort().values


def sample_dims(k: int, keys: Tensor) -> Tensor:
    """Sorted ``[k]`` int64 subset of ``range(D)``, the ``k`` highest of the ``[D]`` ``keys``."""
    return torch.topk(keys, k, sorted=False).indices.sort().values
