"""unicom-kernels: fused, memory-bounded margin softmax with dual partial selection (UNICOM).

Public API: :class:`DualPartialMarginLoss` (module owning the prototypes) and
:func:`dual_partial_margin_loss` (functional form); :func:`class_range` tells which block
of classes a rank owns when the loss is sharded across a process group.
"""

from .distributed import class_range
from .loss import DualPartialMarginLoss, dual_partial_margin_loss

__all__ = ["DualPartialMarginLoss", "class_range", "dual_partial_margin_loss"]
__version__ = "0.1.0"
