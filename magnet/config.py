"""Typed configuration: dataclass sections, YAML files, ``a.b=c`` overrides.

Precedence is defaults < YAML < command line. An unknown key or a value of the wrong type is a
:class:`~magnet.errors.UserError` naming the key (and the file it came from). The resolved config
is written next to every output with :func:`save_config`, together with the git revision.

Sections are plain ``@dataclass(kw_only=True)`` classes; a command declares the root it needs
(e.g. :class:`magnet.synth.SynthConfig`) and loads it with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from magnet import __version__
from magnet.errors import UserError
from magnet.io import atomic_write_text

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    where = f" (in {origin})" if origin else ""
    bad = UserError(f"config: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}{where}")
    o = typing.get_origin(tp)
    if tp is Any:
        return value
    if o in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origin)
            except UserError:
                continue
        raise bad
    if o is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"config: key '{key}' must be one of {list(typing.get_args(tp))}, got {value!r}{where}")
    if o in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if o is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '5e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, origin)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type[T], data: dict, prefix: str, origin: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            where = f" (in {origin})" if origin else ""
            raise UserError(f"config: unknown key '{key}'{where}; known: {', '.join(sorted(fields))}")
        kwargs[name] = _coerce(value, hints[name], key, origin)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"config: section '{prefix or cls.__name__}': {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``'model.width=256'`` -> ``{'model': {'width': 256}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"config: override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"config: override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config: {p}{line}: not valid YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {p}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), **flags: Any) -> T:
    """Build ``cls``: defaults < YAML file < command-line flags (``flags``) < ``key=value`` overrides.

    Each layer is validated on its own, so an error names the file (or the command line) it came from.
    """
    cfg = _build(cls, {}, "", "")
    if path is not None:
        cfg = _build(cls, _merge(to_dict(cfg), load_yaml(path)), "", str(path))
    if flags:
        cfg = _build(cls, _merge(to_dict(cfg), flags), "", "command-line flags")
    if overrides:
        upd: dict = {}
        for o in overrides:
            upd = _merge(upd, parse_override(o))
        cfg = _build(cls, _merge(to_dict(cfg), upd), "", "command line")
    return cfg


def git_revision() -> str:
    """The source revision (``unknown`` outside a git checkout), recorded with every output."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def save_config(cfg: Any, path: str | Path, **extra: Any) -> Path:
    """Write the resolved config (plus ``git_revision`` and ``extra``) as YAML, atomically."""
    doc = {"config": to_dict(cfg), "git_revision": git_revision(), "magnet_version": __version__, **extra}
    p = Path(path)
    atomic_write_text(p, yaml.safe_dump(doc, sort_keys=False))
    return p


def config_from_saved(cls: type[T], path: str | Path) -> T:
    """Reload a config written by :func:`save_config`."""
    return _build(cls, load_yaml(path).get("config", {}), "", str(path))
