"""One configuration format for every step: a dataclass per step, a YAML file, CLI overrides.

A YAML file holds one section per step (``features:``, ``cluster:``, ``train:``, ``evaluate:``,
``demo:``); a command reads its own section and ignores the others. Every field of the step's
dataclass is also a CLI flag (``batch_size`` -> ``--batch-size``); the precedence is
dataclass default < YAML section < command line. Unknown keys, unknown sections and values of
the wrong type raise :class:`ConfigError` naming the key, the file and the valid choices. Numbers
may be given as strings (YAML 1.1 reads ``1e-3`` as one); an integer option takes integral values only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import atomic

SECTIONS = ("features", "cluster", "train", "evaluate", "demo")
T = TypeVar("T")


class UserError(Exception):
    """Base of the errors caused by the user's input (config, data, model); CLIs print them without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration file or value is wrong; the message names the key."""


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turn a :class:`UserError` into ``prog: error: message`` on stderr and exit status 2."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def default_num_workers() -> int:
    """DataLoader workers by default: 4, or fewer on a machine (or CPU set) with fewer cores, where more
    workers than cores only compete (and the DataLoader warns)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def _field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a numeric string, else None.

    PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string, not a float.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(name: str, value: Any, tp: Any, where: str) -> Any:
    """Check / convert one YAML value to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' must not be null")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(name, v, item, where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.strip())  # exact: a float would round integers above 2**53
        number = _number(value)
        if number is None or not number.is_integer():
            raise ConfigError(f"{where}: '{name}' must be an integer, got {value!r}")
        return int(number)
    if base is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{where}: '{name}' must be a number, got {value!r}")
        return number
    if base is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be a string, got {value!r}")
        return str(value)
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and where (PyYAML's own message spans several lines)."""
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_section(path: str | Path, section: str, cls: type) -> dict[str, Any]:
    """Read ``section`` of the YAML file ``path`` and check its keys against ``cls``'s fields.

    Returns a dict of validated values (possibly empty when the section is absent).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is damaged or not UTF-8 text: byte {exc.start} is {exc.object[exc.start]:#04x}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} is unreadable: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections {SECTIONS}")
    unknown_sections = sorted(set(doc) - set(SECTIONS))
    if unknown_sections:
        raise ConfigError(f"config file {path}: unknown section(s) {unknown_sections}; valid sections: {SECTIONS}")
    values = doc.get(section) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: section '{section}' must be a mapping")
    return coerce(cls, values, f"config file {path}, section '{section}'")


def coerce(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check the keys of ``values`` against ``cls``'s fields and convert each value to its field's type.

    ``where`` names the source (a file, a checkpoint) in the :class:`ConfigError` messages.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'; valid keys: {names}")
        out[key] = _coerce(key, value, hints[key], where)
    return out


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` plus one flag per dataclass field (no defaults set)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML config file; this command reads its own section")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{_field_help(f)} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            parser.add_argument(flag, nargs="+", type=item, **kwargs)
            continue
        if optional:

            def convert(text: str, _base: Any = base) -> Any:
                return None if text.lower() in ("none", "null") else _base(text)

            parser.add_argument(flag, type=convert, metavar=base.__name__.upper(), **kwargs)
        else:
            parser.add_argument(flag, type=base, **kwargs)
    return parser


def parse(cls: type[T], section: str, argv: list[str] | None, description: str) -> T:
    """Build ``cls`` from defaults, the ``--config`` file's ``section`` and CLI flags, then validate it."""
    parser = build_parser(cls, f"unicom-{section}", description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    values = read_section(config_path, section, cls) if config_path else {}
    values.update(args)
    return make(cls, values)


def make(cls: type[T], values: dict[str, Any]) -> T:
    """``cls(**values)`` with unknown keys reported by name, then ``validate()`` when defined."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; valid options: {sorted(names)}")
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"'{name}' must be one of {choices}, got {value!r}")


def positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def finite(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the first float option of the dataclass ``cfg`` that is NaN or infinite."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _unwrap_optional(hints[f.name])[0] is float and value is not None and not math.isfinite(value):
            raise ConfigError(f"'{f.name}' must be a finite number, got {value!r}")


def device(name: str, value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is ``auto``, ``cpu`` or a CUDA device this machine has."""
    import torch

    if value == "auto":
        return
    try:
        dev = torch.device(value)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"'{name}' must be auto, cpu, cuda or cuda:N, got {value!r}")
    if dev.type == "cpu":
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(f"'{name}' is {value!r}, but this machine has no usable CUDA device; use auto or cpu")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"'{name}' is {value!r}, but this machine has {count} CUDA device(s)")


def required(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` when a required path/option is empty."""
    if value in (None, ""):
        raise ConfigError(f"'{name}' is required (set it in the config file or with --{name.replace('_', '-')})")


def writable_location(name: str, value: str | Path) -> None:
    """Raise :class:`ConfigError` unless ``value`` is, or can be created as, a writable folder.

    Checked at validation, so that a path under a regular file or in a read-only place fails
    before any work instead of at the first write.
    """
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"'{name}' must be a folder, but {path} is a file")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"'{name}' cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"'{name}' cannot be written: no write permission in {existing}")


def save(cfg: Any, path: str | Path, section: str) -> None:
    """Write ``cfg`` as a one-section YAML file (atomic), loadable with ``--config``."""
    atomic.write_text(path, yaml.safe_dump({section: dataclasses.asdict(cfg)}, sort_keys=False))
