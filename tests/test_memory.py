"""The torch backend never materialises an [N, n_sampled] tensor."""

import pytest
import torch

from unicom_kernels import dual_partial_margin_loss
from unicom_kernels.ops import torch_chunked

try:
    from tests.largest_tensor import LargestTensor
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from largest_tensor import LargestTensor  # type: ignore[no-redef]


def _largest(backend, rows, cols, dim=32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen, requires_grad=True)
    w = (0.01 * torch.randn(cols, dim, generator=gen)).requires_grad_()
    y = torch.randint(0, cols, (rows,), generator=gen)
    with LargestTensor() as mode:
        dual_partial_margin_loss(x, w, y, backend=backend).backward()
    return mode.largest


@pytest.mark.parametrize("rows,cols,dim", [(512, 20000, 32), (3, 4_000_000, 2)])
def test_torch_backend_bounded_by_chunk(rows, cols, dim):
    full = rows * cols
    assert full > torch_chunked.CHUNK_ELEMENTS
    largest = _largest("torch", rows, cols, dim)
    # The bound: one logit chunk, or a [n, D] / [N, D] operand, whichever is larger.
    bound = max(torch_chunked.CHUNK_ELEMENTS, cols * dim, rows * dim)
    assert largest <= bound < full, (largest, bound, full)


def test_reference_materialises_logits():
    """Control: the probe does see an [N, n] tensor when one is made."""
    assert _largest("reference", 512, 20000) >= 512 * 20000
