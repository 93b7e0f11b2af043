"""Row-sparse optimizers for the prototypes of :class:`~unicom_kernels.DualPartialMarginLoss`.

With ``class_sample_rate = 0.1`` a step's loss touches a tenth of the ``C`` prototype rows, but
a dense ``torch.optim.AdamW`` reads and writes all ``C x D`` weights, their gradient and both
moments, and keeps moving the unsampled rows. :class:`SparseRowAdamW` (lazy AdamW) and
:class:`SparseRowSGD` (momentum SGD) are built from the loss module, take over its prototypes
and update only the rows the step sampled, from the compact ``[n, D]`` gradient that the
module's backward then keeps in ``criterion.row_grad`` (no dense gradient is formed). The other
rows, and their state, are not touched. :class:`ChainedOptimizer` drives them together with a
dense optimizer of the backbone under one LR scheduler::

    criterion = DualPartialMarginLoss(num_classes, dim)
    optimizer = ChainedOptimizer(
        torch.optim.AdamW(backbone.parameters(), lr=1e-3),
        SparseRowAdamW(criterion, lr=1e-2),
    )
"""

from ._base import RowSparseOptimizer
from .adamw import SparseRowAdamW, adamw_rows_
from .chain import ChainedOptimizer
from .sgd import SparseRowSGD, sgd_rows_

__all__ = ["ChainedOptimizer", "RowSparseOptimizer", "SparseRowAdamW", "SparseRowSGD", "adamw_rows_", "sgd_rows_"]
