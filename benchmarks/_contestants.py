"""The contestants of :mod:`benchmarks.bench_loss`: our backends, the peers users would otherwise pick, a GEMM floor.

Every contestant solves the same problem (:class:`Problem`): ``N`` embeddings of dim ``D``,
``n`` prototypes (the classes sampled this step; all of them take part), the same random
subset of ``k`` dims, scale ``s`` and margin ``m``. It is wrapped in a :class:`Runner`,
which runs the forward (with autograd recording, as in training) or forward + backward
and hands back the loss and the gradients on the selected dims for the agreement check.

Peers do not select dimensions; they get the ``k`` selected columns cut out *outside* the
timed region (a copy that our own contestants pay for inside it). Peers are imported
lazily, so a missing optional package only makes its contestant unavailable, with the
reason, instead of failing the run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from unicom_kernels import dual_partial_margin_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INSTALL_HINT = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class Settings:
    """One shape and loss configuration, as measured on one device."""

    device: str
    dtype: str
    N: int
    n: int
    D: int
    k: int
    scale: float
    margin: float
    margin_type: str
    margin_grad: str
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of our compiled contestant

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_semantics(self, **overrides: str) -> Settings:
        """The same settings with ``margin_type`` / ``margin_grad`` replaced (a peer's own semantics)."""
        values = {**self.__dict__, **overrides}
        return Settings(**values)


@dataclass
class Problem:
    """The inputs shared by all contestants of one :class:`Settings` (deterministic in ``seed``).

    ``x`` ``[N, D]`` embeddings in the benchmark dtype and ``w`` ``[n, D]`` fp32 prototypes are
    autograd leaves; ``y`` ``[N]`` labels in ``[0, n)``; ``dim_index`` the ``k`` kept dims, sorted
    (``None`` when ``k == D``). Embeddings lean towards their class, as
    in training (target cosines ~0.3), so neither the margin nor the softmax is degenerate.
    """

    x: Tensor
    w: Tensor
    y: Tensor
    dim_index: Tensor | None

    @classmethod
    def make(cls, st: Settings) -> Problem:
        gen = torch.Generator().manual_seed(st.seed)
        w = 0.01 * torch.randn(st.n, st.D, generator=gen)
        y = torch.randint(0, st.n, (st.N,), generator=gen)
        x = torch.randn(st.N, st.D, generator=gen) + F.normalize(w[y], dim=1) * (0.3 * math.sqrt(st.D))
        dim_index = None
        if st.k < st.D:
            dim_index = torch.randperm(st.D, generator=gen)[: st.k].sort().values.to(st.device)
        x = x.to(device=st.device, dtype=st.torch_dtype).requires_grad_()
        w = w.to(st.device).requires_grad_()
        return cls(x, w, y.to(st.device), dim_index)

    def selected_leaves(self) -> tuple[Tensor, Tensor]:
        """Fresh leaves holding only the kept dims of ``x`` and ``w`` (for peers; not timed)."""
        if self.dim_index is None:
            return self.x.detach().clone().requires_grad_(), self.w.detach().clone().requires_grad_()
        x = self.x.detach().index_select(1, self.dim_index).requires_grad_()
        w = self.w.detach().index_select(1, self.dim_index).requires_grad_()
        return x, w

    def select(self, grad: Tensor) -> Tensor:
        """The kept dims of a full-width gradient."""
        return grad if self.dim_index is None else grad.index_select(1, self.dim_index)


class Runner:
    """One contestant bound to one :class:`Problem`.

    Subclasses implement :meth:`loss` (forward with autograd recording), :meth:`grads` and
    :meth:`zero_grad`. ``semantics`` names what the contestant computes when it differs from
    the benchmark settings (the agreement check compares it with the reference under those);
    ``checkable`` is False for the GEMM floor, which is not a loss.
    """

    semantics: dict[str, str] = {}
    checkable = True

    def loss(self) -> Tensor:
        raise NotImplementedError

    def grads(self) -> tuple[Tensor, Tensor]:
        """``(d loss/d x, d loss/d w)`` on the kept dims, ``[N, k]`` and ``[n, k]`` fp32."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def forward(self) -> None:
        """The training forward: autograd records the graph; the loss is dropped at once."""
        self.loss()

    def forward_backward(self) -> None:
        self.loss().backward()


class OursRunner(Runner):
    """``dual_partial_margin_loss`` with one of our backends, optionally under ``torch.compile``."""

    def __init__(self, problem: Problem, st: Settings, backend: str, compiled: bool = False) -> None:
        self.p = problem
        kwargs = dict(
            scale=st.scale,
            margin=st.margin,
            margin_type=st.margin_type,
            margin_grad=st.margin_grad,
            dim_index=problem.dim_index,
            check_values=False,
            backend=backend,
        )
        labels = problem.y

        def fn(x: Tensor, w: Tensor) -> Tensor:
            return dual_partial_margin_loss(x, w, labels, **kwargs)

        if compiled:
            fn = torch.compile(fn, dynamic=True, backend=st.compile_backend)
        self.fn: Callable[[Tensor, Tensor], Tensor] = fn

    def loss(self) -> Tensor:
        return self.fn(self.p.x, self.p.w)

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.p.select(self.p.x.grad).float(), self.p.select(self.p.w.grad).float()

    def zero_grad(self) -> None:
        self.p.x.grad = None
        self.p.w.grad = None


class PmlRunner(Runner):
    """pytorch-metric-learning's ``ArcFaceLoss`` / ``CosFaceLoss``: full softmax over its own ``W [k, n]``.

    Its margin gradient is the true derivative (``semantics``: ``margin_grad="exact"``); its
    ArcFace margin is given in degrees; ``margin_type="none"`` is ArcFace with a zero margin.
    """

    def __init__(self, problem: Problem, st: Settings) -> None:
        from pytorch_metric_learning import losses

        self.x, w = problem.selected_leaves()
        if st.margin_type == "cosface":
            self.module = losses.CosFaceLoss(st.n, st.k, margin=st.margin, scale=st.scale)
        else:
            margin = st.margin if st.margin_type == "arcface" else 0.0
            self.module = losses.ArcFaceLoss(st.n, st.k, margin=math.degrees(margin), scale=st.scale)
        self.module.W = torch.nn.Parameter(w.detach().T.contiguous())
        self.module.to(st.device)
        self.y = problem.y
        self.semantics = {"margin_grad": "exact"}

    def loss(self) -> Tensor:
        return self.module(self.x, self.y)

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.x.grad.float(), self.module.W.grad.T.float()

    def zero_grad(self) -> None:
        self.x.grad = None
        self.module.W.grad = None


class CceRunner(Runner):
    """cut-cross-entropy's ``linear_cross_entropy``, margin-free.

    Cosine logits as a plain dot product: both inputs L2-normalised (inside the timed
    region) and scaled by ``sqrt(s)``, so ``e @ c.T = s * cos``. ``impl`` is ``"cce"`` (its
    Triton kernels, CUDA) or ``"torch_compile"``.
    """

    semantics = {"margin_type": "none"}

    def __init__(self, problem: Problem, st: Settings, impl: str) -> None:
        from cut_cross_entropy import linear_cross_entropy

        self.x, self.w = problem.selected_leaves()
        self.y = problem.y
        root = math.sqrt(st.scale)
        dtype = st.torch_dtype

        def fn(x: Tensor, w: Tensor) -> Tensor:
            e = F.normalize(x, dim=1, eps=1e-12) * root
            c = (F.normalize(w, dim=1, eps=1e-12) * root).to(dtype)
            return linear_cross_entropy(e, c, self.y, impl=impl)

        self.fn = fn

    def loss(self) -> Tensor:
        return self.fn(self.x, self.w)

    def grads(self) -> tuple[Tensor, Tensor]:
        return self.x.grad.float(), self.w.grad.float()

    def zero_grad(self) -> None:
        self.x.grad = None
        self.w.grad = None


class GemmFloorRunner(Runner):
    """Not a loss: the GEMM passes alone, in the compute dtype, as a lower bound.

    Forward: ``Z = X W^T`` (1 pass). Forward + backward: the 3 passes any exact method needs
    (``Z = X W^T``, ``Z W``, ``Z^T X``), with ``Z`` standing in for the softmax gradient.
    """

    checkable = False

    def __init__(self, problem: Problem, st: Settings) -> None:
        x, w = problem.selected_leaves()
        compute = st.torch_dtype
        self.x = x.detach().to(compute)
        self.w = w.detach().to(compute)

    @torch.no_grad()
    def forward(self) -> None:
        self.x @ self.w.T

    @torch.no_grad()
    def forward_backward(self) -> None:
        z = self.x @ self.w.T
        z @ self.w
        z.T @ self.x

    def zero_grad(self) -> None:
        pass


@dataclass(frozen=True)
class Contestant:
    """A named way to compute the loss: ``unavailable(settings)`` gives the reason it cannot run, or None."""

    name: str
    kind: str  # "ours" | "peer" | "floor"
    description: str
    build: Callable[[Problem, Settings], Runner]
    unavailable: Callable[[Settings], str | None] = field(default=lambda st: None)
    package: str | None = None  # distribution name, for the version in the metadata


def _missing(module: str, dist: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{dist} is not installed ({INSTALL_HINT})"
    return None


def _triton_unavailable(st: Settings) -> str | None:
    if st.device != "cuda":
        return "GPU only: on the CPU Triton kernels run interpreted (TRITON_INTERPRET=1); such timings are meaningless"
    return None


def _cce_unavailable(st: Settings) -> str | None:
    if st.device != "cuda":
        return "impl='cce' is Triton kernels for CUDA only (cce-compile is its CPU path)"
    return _missing("cut_cross_entropy", "cut-cross-entropy")


CONTESTANTS: dict[str, Contestant] = {
    c.name: c
    for c in (
        Contestant(
            "triton",
            "ours",
            "fused Triton kernels (backend='triton')",
            lambda p, st: OursRunner(p, st, "triton"),
            _triton_unavailable,
        ),
        Contestant("torch", "ours", "row-chunked PyTorch (backend='torch')", lambda p, st: OursRunner(p, st, "torch")),
        Contestant(
            "reference",
            "ours",
            "Partial-FC style, materialised [N, n] logits (backend='reference')",
            lambda p, st: OursRunner(p, st, "reference"),
        ),
        Contestant(
            "reference-compile",
            "ours",
            "the reference under torch.compile",
            lambda p, st: OursRunner(p, st, "reference", compiled=True),
        ),
        Contestant(
            "pml",
            "peer",
            "pytorch-metric-learning ArcFaceLoss (CosFaceLoss for cosface); full softmax, same s and m",
            PmlRunner,
            lambda st: _missing("pytorch_metric_learning", "pytorch-metric-learning"),
            "pytorch-metric-learning",
        ),
        Contestant(
            "cce",
            "peer",
            "cut-cross-entropy linear_cross_entropy, impl='cce' (margin-free: m = 0)",
            lambda p, st: CceRunner(p, st, "cce"),
            _cce_unavailable,
            "cut-cross-entropy",
        ),
        Contestant(
            "cce-compile",
            "peer",
            "cut-cross-entropy linear_cross_entropy, impl='torch_compile' (margin-free: m = 0)",
            lambda p, st: CceRunner(p, st, "torch_compile"),
            lambda st: _missing("cut_cross_entropy", "cut-cross-entropy"),
            "cut-cross-entropy",
        ),
        Contestant(
            "gemm-floor",
            "floor",
            "not a loss: the GEMM passes alone (1 forward, 3 forward+backward)",
            GemmFloorRunner,
        ),
    )
}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the peers' packages (None when missing)."""
    out: dict[str, str | None] = {}
    for dist in sorted({c.package for c in CONTESTANTS.values() if c.package}):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
