"""A probe for sync tests: fail on every op that would make the host wait for a CUDA device.

A training step that never waits for the device lets the CPU queue the next step while
this one runs, and can be captured in a CUDA graph. On a GPU ``torch.cuda.set_sync_debug_mode
("error")`` is the authority; :class:`NoHostSync` checks the same property on a CPU-only
machine, op by op, so a CPU tensor here stands for a CUDA tensor. It raises
``AssertionError`` naming the op, the reason and the calling line in ``unicom_kernels``.

Caught, with why they wait (the CUDA kernels in aten read a device value on the host,
through ``memcpy_and_sync`` or ``.item()``):

- ``_local_scalar_dense`` / ``is_nonzero``: ``.item()``, ``int(t)``, ``float(t)``,
  ``bool(t)`` (``if t.any():``); ``Tensor.tolist()`` and ``Tensor.numpy()``, which read
  the data without an aten op on the CPU, at the ``torch`` function level.
- output shapes that depend on values: ``nonzero`` (not ``nonzero_static``),
  ``nonzero_numpy``, ``masked_select``, every ``unique`` variant, ``repeat_interleave``
  without ``output_size``; ``index`` / ``index_put`` with a bool or uint8 index (a mask
  is expanded through ``nonzero``), except ``t[mask] = scalar``, which runs as
  ``masked_fill_`` when the value is a 0-dim CPU tensor.
- a host-side check of the result: ``equal``, ``allclose``, ``bincount`` (its length is
  the maximum), ``histc`` with ``min == max`` (the range is read from the data),
  ``multinomial`` without replacement or with one sample (a validity check),
  ``masked_scatter`` (counts the mask), ``masked_fill`` with a device value tensor,
  ``_linalg_check_errors`` (the non-``_ex`` ``torch.linalg`` functions).
- copies to the CPU from a device tensor (``_to_copy``, ``copy_``), judged by the tensors'
  real devices (so never on a CPU-only machine). Non-blocking ones too: their result can
  only be read after waiting for the device.

``_assert_async`` does not wait, and passes. Not seen: a 0-dim value computed on the device
and assigned through a mask (``t[mask] = y.sum()``) looks like a host scalar here; on a GPU
it takes the ``nonzero`` path.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Directory prefixes (with the separator, so that ``unicom_kernels.egg-info`` is not inside).
_PACKAGE_DIR = os.path.abspath(importlib.util.find_spec("unicom_kernels").submodule_search_locations[0]) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep

_ALWAYS = {
    "_local_scalar_dense": "reads a device value on the host (.item(), int(), float(), bool(), if t:)",
    "is_nonzero": "reads a device value on the host (bool(t))",
    "nonzero": "output shape depends on the values (use nonzero_static or fixed-shape ops)",
    "nonzero_numpy": "output shape depends on the values",
    "masked_select": "output shape depends on the values",
    "masked_scatter": "reads the number of mask entries",
    "masked_scatter_": "reads the number of mask entries",
    "equal": "returns a host bool",
    "allclose": "returns a host bool",
    "bincount": "reads the maximum to size its output",
    "_linalg_check_errors": "reads the LAPACK info on the host (use the _ex variant)",
}
_SHAPE_FROM_VALUES = "output shape depends on the values"
_MASK_INDEX = "boolean-mask indexing expands the mask through nonzero"
_INDEX_OPS = {"index", "_unsafe_index"}
_INDEX_PUT_OPS = {"index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}


def _arg(func, args: tuple, kwargs: dict, name: str):
    """The argument ``name`` of the call (positional or keyword), or its default."""
    for i, schema_arg in enumerate(func._schema.arguments):
        if schema_arg.name == name:
            if name in kwargs:
                return kwargs[name]
            if i < len(args) and not schema_arg.kwarg_only:
                return args[i]
            return schema_arg.default_value
    return None


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _index_put_runs_as_masked_fill(indices: list, value: torch.Tensor, accumulate: bool) -> bool:
    """aten's ``canDispatchToMaskedFill`` (one mask, a one-element CPU value, no accumulation).

    A Python scalar arrives as a 0-dim CPU tensor on a GPU too; so, the CPU standing for the
    device here, only 0-dim values are taken for host values.
    """
    defined = [i for i in indices if i is not None]
    return (
        not accumulate
        and value.dim() == 0
        and value.device.type == "cpu"
        and len(defined) == 1
        and _is_mask(defined[0])
    )


def _to_host_from_device(src: object, dst_device: torch.device | None) -> bool:
    return (
        isinstance(src, torch.Tensor)
        and src.device.type != "cpu"
        and dst_device is not None
        and torch.device(dst_device).type == "cpu"
    )


def sync_reason(func, args: tuple, kwargs: dict) -> str | None:
    """Why the aten op ``func`` called with these arguments waits for the device, or ``None``."""
    name = func._schema.name.split("::")[-1]
    if name in _ALWAYS:
        return _ALWAYS[name]
    if name.startswith(("unique", "_unique")):
        return _SHAPE_FROM_VALUES
    if name == "repeat_interleave" and _arg(func, args, kwargs, "output_size") is None:
        return _SHAPE_FROM_VALUES + " (pass output_size)"
    if name in _INDEX_OPS and any(_is_mask(i) for i in _arg(func, args, kwargs, "indices")):
        return _MASK_INDEX
    if name in _INDEX_PUT_OPS:
        indices = _arg(func, args, kwargs, "indices")
        value, accumulate = _arg(func, args, kwargs, "values"), bool(_arg(func, args, kwargs, "accumulate"))
        if any(_is_mask(i) for i in indices) and not _index_put_runs_as_masked_fill(indices, value, accumulate):
            return _MASK_INDEX
    if name == "multinomial" and (
        not _arg(func, args, kwargs, "replacement") or _arg(func, args, kwargs, "num_samples") == 1
    ):
        return "checks the probabilities on the host (without replacement, or one sample)"
    if name == "histc" and _arg(func, args, kwargs, "min") == _arg(func, args, kwargs, "max"):
        return "reads the data's range on the host (min == max)"
    if name in ("masked_fill", "masked_fill_"):
        value = _arg(func, args, kwargs, "value")
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return "reads the device value tensor on the host (pass a Python scalar)"
    if name == "_to_copy":
        src = args[0]
        if _to_host_from_device(src, kwargs.get("device") or src.device):
            return "copies a device tensor to the host"
    if name in ("copy_", "copy"):
        dst, src = args[0], args[1]
        if _to_host_from_device(src, dst.device):
            return "copies a device tensor to the host"
    return None


def _caller() -> str:
    """The innermost frame in ``unicom_kernels`` (else outside torch and this file), as ``path:line in name``."""
    fallback = None
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        where = f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        if path.startswith(_PACKAGE_DIR):
            return where
        if fallback is None and not path.startswith(_TORCH_DIR) and path != os.path.abspath(__file__):
            fallback = where
        frame = frame.f_back
    return fallback or "<unknown>"


def _fail(what: str, why: str) -> AssertionError:
    return AssertionError(f"{what} would synchronise the host with the device: {why}; called from {_caller()}")


class _HostReads(TorchFunctionMode):
    """Data reads that dispatch no aten op on the CPU."""

    _READS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}

    def __init__(self, owner: NoHostSync) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._READS:
            self.owner.waits(self._READS[func], "reads the data on the host")
        return func(*args, **(kwargs or {}))


class NoHostSync(TorchDispatchMode):
    """``with NoHostSync(): ...`` raises ``AssertionError`` at the first op that would wait for the device.

    ``allow``: that many waits pass first (each recorded in ``seen``), for code that documents
    a fixed number of them.
    """

    def __init__(self, allow: int = 0) -> None:
        super().__init__()
        self.allow = allow
        self.seen: list[str] = []

    def waits(self, what: str, why: str) -> None:
        """Record a wait, or raise once more than ``allow`` of them happened."""
        error = _fail(what, why)
        if len(self.seen) >= self.allow:
            raise error
        self.seen.append(str(error))

    def __enter__(self):
        self._reads = _HostReads(self)
        self._reads.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._reads.__exit__(*sys.exc_info())
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._reads.__exit__(exc_type, exc, tb)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = sync_reason(func, args, kwargs)
        if why is not None:
            self.waits(f"aten.{func._schema.name.split('::')[-1]}", why)
        return func(*args, **kwargs)
