"""Typed configs: dataclass defaults (the papers' values) <- YAML file <- `--set key.sub=value` overrides <- flags.

Each stage defines its own dataclasses; this module only turns dicts into them and back, refusing unknown
keys and wrong types with a message that names the file and the key. The command line becomes dataclasses here,
once (`load_config`, then `with_flags`); later changes go through `dataclasses.replace` (`replace_nested`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmrc.errors import LmrcError
from lmrc.io import atomic_write_text

T = TypeVar("T")

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_path(value: str, where: str) -> Path:
    """Expand `$VAR` / `${VAR}` and `~` in a config path; an unset variable is an error naming the config key."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if not os.environ.get(name):
            raise LmrcError(f"{where}: {value!r} uses ${{{name}}}, which is not set (export {name}=...)")
        return os.environ[name]

    return Path(_VAR.sub(sub, value)).expanduser()


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmrcError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise LmrcError(f"{path}: is a folder, expected a YAML config file") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise LmrcError(
            f"{path}: line {line}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"
        ) from None
    except OSError as exc:
        raise LmrcError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise LmrcError(f"{path}: {place}malformed YAML") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # A scalar YAML resolves but cannot build (a date such as 2020-13-45), or nesting too deep to read.
        raise LmrcError(f"{path}: malformed YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmrcError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise LmrcError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise LmrcError(f"--set {item}: empty key")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LmrcError(f"--set {item}: '{p}' is not a section")
        node[parts[-1]] = parsed
    return data


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except LmrcError as exc:
                errors.append(str(exc))
        raise LmrcError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise LmrcError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LmrcError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise LmrcError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LmrcError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise LmrcError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-5" (no dot) as a string
        raise LmrcError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no`/`yes` (e.g. mixed_precision: no) as a boolean.
            return "yes" if value else "no"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise LmrcError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise LmrcError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LmrcError(f"{where}: {exc}") from None


def replace_nested(obj: T, changes: Mapping[str, Any], where: str = "config") -> T:
    """`obj` with `changes` applied through `dataclasses.replace`: a nested mapping of field names to values, as a
    YAML section gives them (`{generation: {batch_size: 4}}`); a mapping for a dataclass field changes only the
    keys it names. Values are checked and converted as `from_dict` does; an unknown key or a bad value is an
    error naming `where` and the key."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in changes.items():
        if key not in names:
            raise LmrcError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            kwargs[key] = replace_nested(current, value, f"{where}.{key}")
        else:
            kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    try:
        return dataclasses.replace(obj, **kwargs)  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        raise LmrcError(f"{where}: {exc}") from None


def with_flags(obj: T, flags: Mapping[str, Any]) -> T:
    """`obj` with the command-line flags that were given (None: not given, so the config's value stays), through
    `dataclasses.replace`. Flags name themselves, so a bad combination is reported without a file name."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return dataclasses.replace(obj, **given)  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        raise LmrcError(str(exc)) from None


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> T:
    """Build `cls` from defaults, an optional YAML file and `--set` overrides."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return from_dict(cls, data, str(path) if path else "config")


def to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config next to an output, so the run can be repeated from its folder alone."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
