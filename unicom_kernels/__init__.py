"""unicom-kernels: fused, memory-bounded margin softmax with dual partial selection (UNICOM).

Public API: :class:`DualPartialMarginLoss` (module owning the prototypes) and
:func:`dual_partial_margin_loss` (functional form); :func:`class_range` tells which block
of classes a rank owns when the loss is sharded across a process group, and
:func:`exclude_shards_from_ddp` keeps those blocks out of ``DistributedDataParallel`` when
the loss is part of the wrapped module. :mod:`unicom_kernels.optim` holds row-sparse
optimizers that update only the prototypes a step sampled.
"""

from .distributed import class_range, exclude_shards_from_ddp
from .loss import DualPartialMarginLoss, dual_partial_margin_loss

__all__ = ["DualPartialMarginLoss", "class_range", "dual_partial_margin_loss", "exclude_shards_from_ddp"]
__version__ = "0.1.0"
