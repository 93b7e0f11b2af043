"""Dual partial selection: which classes and which feature dimensions take part in a step.

DESIGN.md section 2.3-2.4. Both samplers draw from an explicit ``torch.Generator`` so a
(seed, step) pair fixes the sample; :func:`step_generator` derives one per stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, step, stream)``.

    Well-mixed, so neighbouring steps or seeds give unrelated samples. Streams keep the
    class and dimension draws independent; every process that passes the same triple
    draws the same numbers on the same device type.
    """
    state = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ stream)
    return torch.Generator(device=device).manual_seed(state >> 1)


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return fallback if generator is None else generator.device


def num_sampled_classes(num_positives: int, num_classes: int, rate: float) -> int:
    """``max(|P|, int(rate * C), 1)``: all positives, topped up with negatives to the rate.

    At least one class, so a batch (or a rank's block) without positives at a tiny rate
    still yields a well-defined log-sum-exp instead of an empty set.
    """
    return max(num_positives, int(rate * num_classes), 1)


def sample_classes(
    positives: Tensor, num_classes: int, rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted class indices: every positive plus distinct uniform-random negatives.

    Args:
        positives: ``[P]`` int64, distinct labels of the batch (any order).
        num_classes: ``C``; the result indexes ``[0, C)``.
        rate: ``class_sample_rate`` in ``(0, 1]``; ``1.0`` returns every class.
        generator: source of randomness; its device is where the draw happens.

    Returns:
        ``[n]`` int64 on ``positives.device``, sorted, ``n = max(P, int(rate * C), 1)``.
    """
    device = positives.device
    if rate >= 1.0:
        return torch.arange(num_classes, device=device)
    n = num_sampled_classes(positives.numel(), num_classes, rate)
    # Random scores in [0, 1); positives get 2 so top-n keeps them all and fills the
    # rest with the n - P highest-scoring negatives: a uniform draw without replacement.
    draw_device = _device_of(generator, device)
    scores = torch.rand(num_classes, generator=generator, device=draw_device)
    scores[positives.to(draw_device)] = 2.0
    chosen = torch.topk(scores, n, sorted=False).indices
    return chosen.sort().values.to(device)


def sample_dims(
    dim: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """Sorted ``[k]`` int64 subset of ``range(dim)``, uniform without replacement."""
    draw_device = _device_of(generator, torch.device(device))
    perm = torch.randperm(dim, generator=generator, device=draw_device)
    return perm[:k].sort().values.to(device)
