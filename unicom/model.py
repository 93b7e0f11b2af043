"""Backbones (open_clip visual towers, timm ViTs) with an embedding head, their transforms, and CLIP loading.

Architectures are named ``open_clip:<model>`` (any open_clip model name, or the name of a custom
JSON architecture passed as ``model_config``) or ``timm:<model>`` (e.g. ``timm:vit_small_patch16_224``).
``pretrained`` is an open_clip tag (downloaded by open_clip, so online only) or a local weights file;
``None`` means random initialisation.

An open_clip model's input (side, mean, std) is what open_clip records on the model it builds, read by
:func:`open_clip_input` for training, features and evaluation alike: a tag's own normalisation (0.5 for
SigLIP tags, ImageNet's for CLIPA...), for a weights file the one all tags of its architecture share
(:func:`pretrained_preprocess`), else CLIP's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .config import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
OPEN_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # open_clip ignores an architecture file without them


class ModelError(UserError, ValueError):
    """A model name, config or weights file is wrong; the message names it."""


def read_model_config(path: str | os.PathLike) -> dict:
    """A custom open_clip architecture JSON file as ``{"name": its file stem, "config": the architecture}``.

    Checkpoints store this, so that they load without the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"open_clip model_config file not found: {path}")
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"open_clip model_config {path} is not valid JSON: {exc}") from exc
    if not isinstance(arch, dict) or not all(k in arch for k in OPEN_CLIP_KEYS):
        raise ModelError(f"open_clip model_config {path} is not an architecture: it needs the keys {OPEN_CLIP_KEYS}")
    return {"name": path.stem, "config": arch}


def model_config_name(model_config: str | os.PathLike | dict) -> str:
    """The architecture name a ``model_config`` registers (see :func:`read_model_config`), without reading it."""
    return model_config["name"] if isinstance(model_config, dict) else Path(model_config).stem


def _register_for(name: str, model_config: str | os.PathLike | dict | None) -> None:
    """Register ``model_config`` for the open_clip model ``name``; one of another name is refused, since
    open_clip would build the model called ``name`` and leave the custom architecture unused."""
    if not model_config:
        return
    custom = model_config_name(model_config)
    if custom != name:
        source = "the checkpoint's model_config" if isinstance(model_config, dict) else f"model_config {model_config}"
        raise ModelError(
            f"{source} defines the open_clip architecture {custom!r} (named by its file), but the model asked "
            f"for is {name!r}: name the model {custom!r} (arch 'open_clip:{custom}'), or rename the file"
        )
    register_open_clip_config(model_config)


def register_open_clip_config(model_config: str | os.PathLike | dict | None) -> None:
    """Make a custom open_clip architecture known to open_clip under its name.

    ``model_config``: a JSON file (its stem is the model name) or :func:`read_model_config`'s dict.
    It replaces an architecture of the same name registered before (an earlier run's file, say).
    """
    if not model_config:
        return
    import open_clip

    custom = model_config if isinstance(model_config, dict) else read_model_config(model_config)
    if open_clip.get_model_config(custom["name"]) == custom["config"]:
        return
    # open_clip registers architectures from files only; its registry keeps them once the file is gone.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{custom['name']}.json"
        path.write_text(json.dumps(custom["config"]), encoding="utf-8")
        open_clip.add_model_config(path)


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of a user's file onto the CPU (tensors and plain containers only).

    A truncated, corrupt or foreign file raises :class:`ModelError` naming it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises RuntimeError, KeyError, EOFError, UnpicklingError... by damage
        raise ModelError(f"{path} is not a readable PyTorch file (truncated or corrupt?): {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception's message, for one-line errors."""
    first = re.split(r"(?<=\.)\s|\n", str(exc).strip(), maxsplit=1)[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_weights(module: nn.Module, weights: Any, path: str | os.PathLike, target: str | None = None) -> None:
    """Load the state_dict ``weights`` read from ``path`` into ``module``.

    Missing or unexpected keys and wrong shapes raise :class:`ModelError` naming ``path`` and ``target``
    (what ``module`` is; default: the module's class, built from the checkpoint's config) in one line,
    unlike ``load_state_dict``'s list of every key.
    """
    target = target or f"the {type(module).__name__} of its config"
    if not isinstance(weights, dict):
        raise ModelError(f"{path}: the weights are a {type(weights).__name__}, not a state_dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} has shape {tuple(getattr(weights[k], 'shape', ()))}, the model's is {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(v, torch.Tensor) and k in weights and getattr(weights[k], "shape", None) != v.shape
    ]
    problems = [f"{len(missing)} missing keys (e.g. {missing[:3]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"] if unexpected else []
    problems += shapes[:3]
    if problems:
        raise ModelError(f"{path}: the weights do not fit {target}: {'; '.join(problems)}")
    module.load_state_dict(weights)


def _offline_variables() -> list[str]:
    """The variables of :data:`OFFLINE_VARIABLES` that switch the Hugging Face hub off here (empty: online)."""
    return [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def _cached(cfg: dict) -> bool:
    """True when open_clip finds the weights of a pretrained ``cfg`` in its cache without the network.

    Like open_clip: from the Hugging Face hub when the tag has a hub entry and huggingface_hub is
    installed (the ``.bin`` or its ``.safetensors`` twin), else from the URL into ``~/.cache/clip``.
    """
    if cfg.get("hf_hub") and importlib.util.find_spec("huggingface_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        names = (filename, os.path.splitext(filename)[0] + ".safetensors", "open_clip_model.safetensors")
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.expanduser(f"~/.cache/clip/{os.path.basename(url)}"))


def _check_pretrained(name: str, pretrained: str | None) -> None:
    """Fail at once on an open_clip ``pretrained`` that cannot be loaded: neither a local file nor a tag of
    ``name``, or a tag whose weights are not cached while offline (the hub would retry for a minute first)."""
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise ModelError(
            f"pretrained={pretrained!r} is neither a local file nor a tag of open_clip {name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)})"
        )
    offline = _offline_variables()
    if offline and not _cached(cfg):
        raise ModelError(
            f"pretrained={pretrained!r} of open_clip {name} needs a download, but {'/'.join(offline)} says this "
            "machine is offline and the weights are not cached: download them elsewhere and pass the local file "
            "as pretrained"
        )


def pretrained_preprocess(name: str, pretrained: str | None) -> dict:
    """The ``mean`` / ``std`` the open_clip weights ``pretrained`` of architecture ``name`` expect (empty:
    open_clip's default, CLIP's). A tag names them; a weights file does not, so a file gets the ones all tags
    of ``name`` share (SigLIP architectures: 0.5), else CLIP's. Depends on names only, not on the file."""
    import open_clip

    if not pretrained:
        return {}
    tag = open_clip.get_pretrained_cfg(name, pretrained)  # open_clip too takes a tag before a file of that name
    tags = [] if tag else open_clip.list_pretrained_tags_by_model(name)
    cfgs = [tag] if tag else [open_clip.get_pretrained_cfg(name, t) for t in tags]
    found = {(tuple(c["mean"]), tuple(c["std"])) for c in cfgs if c.get("mean") and c.get("std")}
    if len(found) != 1:
        return {}
    mean, std = found.pop()
    return {"mean": mean, "std": std}


def open_clip_input(model: nn.Module) -> tuple[int, tuple, tuple]:
    """``(image side, mean, std)`` an open_clip model (or its visual tower) built here expects: the one
    source of an open_clip model's preprocessing for :func:`build_model` and :func:`load_clip`'s callers."""
    visual = getattr(model, "visual", model)
    size = visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    return int(size), mean, std


def _create_open_clip(name: str, pretrained: str | None, load: bool = True, **kwargs: Any) -> nn.Module:
    """open_clip's ``create_model`` with the input normalisation of :func:`pretrained_preprocess`.

    ``load=False``: random weights, no file or download needed (a saved state is loaded over them).
    """
    import open_clip

    kwargs["force_preprocess_cfg"] = pretrained_preprocess(name, pretrained)
    if not load:
        # The text tower is never used here: no download of its base weights either.
        return open_clip.create_model(name, pretrained=None, pretrained_text=False, **kwargs)
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
    except Exception as exc:  # a damaged local weights file fails inside torch.load with any of several types
        if not pretrained:
            raise
        if os.path.isfile(pretrained):
            raise ModelError(
                f"cannot load the weights file {pretrained} into open_clip {name}: {_reason(exc)}"
            ) from exc
        raise ModelError(
            f"cannot load pretrained={pretrained!r} for open_clip {name}: {_reason(exc)} "
            "(offline: download the weights elsewhere and pass the local file as pretrained)"
        ) from exc


def load_clip(
    name: str, pretrained: str | None = None, model_config: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, int]:
    """Create an open_clip model: returns ``(model in eval mode, tokenizer, image_size)``.

    ``pretrained``: an open_clip tag or a local file; ``None`` gives random weights (say so to users).
    ``model_config`` must define the architecture ``name``. Normalise images with
    ``eval_transform(*open_clip_input(model))``: the mean/std are the weights' own, not always CLIP's.
    """
    import open_clip

    model = _open_clip_model(name, pretrained, model_config, device=device)
    model.eval()
    return model, open_clip.get_tokenizer(name), open_clip_input(model)[0]


class EmbeddingModel(nn.Module):
    """``images [B, 3, H, W] float -> embeddings [B, embedding_dim]`` (not normalised; the loss normalises).

    ``backbone`` maps images to ``[B, feature_dim]``; ``head`` is a linear map to ``embedding_dim``.
    ``image_size``, ``mean`` and ``std`` describe the expected input.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, embedding_dim: int, image_size: int, mean: tuple, std: tuple
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_model(
    arch: str,
    embedding_dim: int,
    pretrained: str | None = None,
    model_config: str | dict | None = None,
    image_size: int | None = None,
    load_pretrained: bool = True,
) -> EmbeddingModel:
    """Backbone named by ``arch`` (``open_clip:<name>`` / ``timm:<name>``) + a linear head to ``embedding_dim``.

    ``model_config``: a custom open_clip architecture, see :func:`register_open_clip_config`; it must define
    ``<name>`` (a file ``<name>.json``). The model's ``image_size`` / ``mean`` / ``std`` are those of
    ``pretrained`` (see :func:`pretrained_preprocess`; timm: the architecture's ``pretrained_cfg``).
    A timm ``pretrained`` file must fit the architecture: no missing or unexpected keys (its ImageNet
    classifier aside) and, for a ViT built for another ``image_size``, a position embedding resampled to it.
    ``load_pretrained=False``: random weights but ``pretrained``'s input normalisation, needing neither the
    file nor a download, for loading a saved state over it.
    """
    kind, _, name = arch.partition(":")
    if kind == "open_clip" and name:
        kwargs = {"force_image_size": image_size} if image_size else {}
        visual = _open_clip_model(name, pretrained, model_config, load_pretrained, **kwargs).visual
        size, mean, std = open_clip_input(visual)
        return EmbeddingModel(visual, int(visual.output_dim), embedding_dim, size, mean, std)
    if kind == "timm" and name:
        backbone = _create_timm(name, image_size)
        if pretrained and load_pretrained:
            _load_timm_file(backbone, name, pretrained)
        cfg = backbone.pretrained_cfg or {}
        size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        return EmbeddingModel(backbone, _timm_feature_dim(backbone), embedding_dim, size, mean, std)
    raise ModelError(f"arch must be 'open_clip:<name>' or 'timm:<name>', got {arch!r}")


def _open_clip_model(
    name: str, pretrained: str | None, model_config: str | dict | None, load: bool = True, **kwargs: Any
) -> nn.Module:
    """open_clip model ``name`` (with ``model_config`` registered) for :func:`build_model` and :func:`load_clip`;
    ``load=False`` as in :func:`_create_open_clip`, with no check of ``pretrained`` (it is not read)."""
    import open_clip

    _register_for(name, model_config)
    if name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip model {name!r}; pass model_config=<json> for a custom architecture")
    if load:
        _check_pretrained(name, pretrained)
    return _create_open_clip(name, pretrained, load, **kwargs)


def _timm_feature_dim(backbone: nn.Module) -> int:
    """Width of a classifier-less timm model's output: ``head_hidden_size`` where the pooled features pass
    through a pre-logits layer (MobileNetV3, GhostNet...), which ``num_features`` does not count."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _load_timm_file(backbone: nn.Module, name: str, path: str) -> None:
    """Load a local timm weights file (a state_dict, or one under ``state_dict`` / ``model``) into ``backbone``."""
    if not os.path.isfile(path):
        raise ModelError(f"timm weights file not found: {path} (only local files are supported)")
    state = load_file(path)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if isinstance(state, dict):
        state = _resample_pos_embed(backbone, _without_classifier(backbone, state))
    load_weights(backbone, state, path, f"timm:{name}")


def _without_classifier(backbone: nn.Module, state: dict) -> dict:
    """``state`` less its ImageNet classifier (``pretrained_cfg['classifier']``, e.g. ``fc`` or ``head``),
    which the embedding head replaces; keys the model itself has stay, to be checked."""
    names = (backbone.pretrained_cfg or {}).get("classifier") or ()
    prefixes = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    own = backbone.state_dict()
    return {k: v for k, v in state.items() if k in own or not (prefixes and k.startswith(prefixes))}


def _resample_pos_embed(backbone: nn.Module, state: dict) -> dict:
    """``state`` with its ViT position embedding interpolated to the model's patch grid, when the model was
    built for another ``image_size`` than the weights (as timm does when it loads its own weights)."""
    pos, own = state.get("pos_embed"), getattr(backbone, "pos_embed", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, torch.Tensor) or not isinstance(own, torch.Tensor) or grid is None:
        return state
    if pos.shape == own.shape or pos.ndim != 3 or own.ndim != 3:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    try:
        resized = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
    except RuntimeError:  # not a square grid of tokens: load_weights names the shapes
        return state
    return {**state, "pos_embed": resized}


def _create_timm(name: str, image_size: int | None) -> nn.Module:
    """A timm backbone without classifier, built for ``image_size`` when its constructor takes ``img_size``
    (ViTs, whose position embeddings depend on it); other models (CNNs) take any size as it comes."""
    try:
        return _create_timm_model(name, image_size)
    except RuntimeError as exc:
        raise ModelError(f"timm cannot create {name!r}: {exc}") from exc


def _create_timm_model(name: str, image_size: int | None) -> nn.Module:
    import timm

    if image_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=False, num_classes=0)


class ImageTransform:
    """PIL image -> ``[3, image_size, image_size]`` float32, normalised with ``mean`` / ``std``.

    Evaluation (``train=False``): resize the shorter side (bicubic), centre crop. Training: a
    random resized crop (area fraction in ``[crop_scale, 1]``, aspect ratio in ``[3/4, 4/3]``) and
    an optional horizontal flip, drawn from the ``random.Random`` passed in, so that a dataset can
    seed every sample's augmentation cheaply and reproducibly (``rng=None``: a fresh unseeded one).
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple = CLIP_MEAN,
        std: tuple = CLIP_STD,
        train: bool = False,
        crop_scale: float = 0.6,
        hflip: bool = False,
    ) -> None:
        self.size, self.mean, self.std = image_size, list(mean), list(std)
        self.train, self.crop_scale, self.hflip = train, crop_scale, hflip

    def _crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(self.crop_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        from torchvision.transforms import functional as TF  # imported here: it takes seconds, which --help would pay

        bicubic = TF.InterpolationMode.BICUBIC
        if self.train:
            rng = rng or random.Random()
            top, left, h, w = self._crop_box(image.width, image.height, rng)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=bicubic)
            if self.hflip and rng.random() < 0.5:
                image = TF.hflip(image)
        else:
            image = TF.center_crop(TF.resize(image, self.size, interpolation=bicubic), [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def pixel_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> ``[3, size, size]`` float32 raw pixels in [0, 1] (the ``pixels`` baselines)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.ToTensor()])


def eval_transform(image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> ImageTransform:
    """Evaluation transform (see :class:`ImageTransform`)."""
    return ImageTransform(image_size, mean, std)


def train_transform(
    image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD, crop_scale: float = 0.6, hflip: bool = False
) -> ImageTransform:
    """Training augmentation (see :class:`ImageTransform`)."""
    return ImageTransform(image_size, mean, std, train=True, crop_scale=crop_scale, hflip=hflip)
