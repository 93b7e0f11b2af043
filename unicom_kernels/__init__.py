"""unicom-kernels: fused, memory-bounded margin softmax with dual partial selection (UNICOM).

Public API: :class:`DualPartialMarginLoss` (module owning the prototypes) and
:func:`dual_partial_margin_loss` (functional form).
"""

from .loss import DualPartialMarginLoss, dual_partial_margin_loss

__all__ = ["DualPartialMarginLoss", "dual_partial_margin_loss"]
__version__ = "0.1.0"
