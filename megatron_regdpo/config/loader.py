"""YAML recipe (+ `base:` inheritance, + CLI overrides) -> typed, frozen `Config`.

Conversion is strict on purpose: a typo'd key or a string where a number belongs
should fail at launch on one machine, not an hour later on 512 GPUs. Every
problem is reported at once, one line each, naming the dotted key and the file
(or override) that set it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from .schema import Config, ConfigError

_NoneType = type(None)
_BAD = object()  # marks a field that failed conversion; its error is already recorded


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float: PyYAML follows YAML 1.1, where an
    exponent without a dot is a *string*, and that is how learning rates get written."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {where}: {e}") from None


# ---------------------------------------------------------------- dict stage


def _merge(base: dict, child: dict) -> dict:
    """Child over base: mappings merge recursively, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in child.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_dicts else value
    return out


def _dotted(data: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            yield full
            yield from _dotted(value, full)


def _read(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Load one recipe and its `base:` chain. Also returns, for every dotted key, the
    file that set it last, so errors in an inherited key point at the right file."""
    shown, real = os.path.normpath(path), path.resolve()
    if real in chain:
        raise ConfigError("config inheritance cycle: " + " -> ".join(map(str, (*chain, real))))
    try:
        text = path.read_text()
    except OSError as e:
        named_by = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"cannot read config {shown}{named_by}: {e.strerror}") from None
    data = _parse_yaml(text, shown)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: top level must be a mapping, got {type(data).__name__}")
    origins = {key: shown for key in _dotted(data)}
    base = data.pop("base", None)
    if base is None:
        return data, origins
    if not isinstance(base, str):
        raise ConfigError(f"{shown}: 'base' must be a path, got {type(base).__name__} {base!r}")
    base_data, base_origins = _read(path.parent / base, (*chain, real))
    return _merge(base_data, data), {**base_origins, **origins}


def _split_override(override: str) -> tuple[str, Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise ConfigError(f"bad override {override!r}: expected key.sub=value")
    return key, _parse_yaml(raw, f"override {override!r}")


def _overrides(overrides: Iterable[str]) -> tuple[dict, dict[str, str]]:
    data: dict = {}
    origins: dict[str, str] = {}
    for override in overrides:
        key, value = _split_override(override)
        origins.update((k, f"override {override!r}") for k in (key, *_dotted(value, key)))
        for part in reversed(key.split(".")):
            value = {part: value}
        data = _merge(data, value)
    return data, origins


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['parallel.tp=2', 'model.patch=[1,2,2]'] -> {'parallel': {'tp': 2}, 'model': {'patch': [1, 2, 2]}}.
    Values are YAML, so numbers, bools, lists and null come out typed; later ones win."""
    return _overrides(overrides)[0]


# ---------------------------------------------------------------- typed stage


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not _NoneType) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        if origin is list or args[-1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        names = {_type_name(a) for a in args}
        return f"list of {len(args)} {names.pop()}" if len(names) == 1 else f"list [{', '.join(map(_type_name, args))}]"
    return "mapping" if dataclasses.is_dataclass(tp) else tp.__name__


def _check(tp: Any, v: Any) -> tuple[bool, Any]:
    """Is `v` a valid `tp`? Returns (ok, converted value)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # the schema only uses Optional[X]
        return (_NoneType in args, None) if v is None else _check(next(a for a in args if a is not _NoneType), v)
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in args), v
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False, v
        elem_types = args[:1] * len(v) if origin is list or args[-1] is Ellipsis else args
        if len(elem_types) != len(v):
            return False, v
        checked = [_check(t, x) for t, x in zip(elem_types, v)]
        return all(ok for ok, _ in checked), tuple(x for _, x in checked)  # tuples keep the tree hashable
    if tp is float and type(v) is int:
        return True, float(v)
    # Exact type: bool subclasses int, but `tp: true` or `fsdp: 1` is always a mistake.
    return type(v) is tp, v


class _Builder:
    def __init__(self, origins: dict[str, str], source: str | None):
        self.origins, self.source, self.errors = origins, source, []

    def where(self, key: str) -> str | None:
        while key and key not in self.origins:
            key = key.rpartition(".")[0]
        return self.origins.get(key, self.source)

    def error(self, key: str, message: str) -> None:
        where = self.where(key)
        self.errors.append(f"{message} (in {where})" if where else message)

    def unknown(self, key: str, valid: list[str]) -> None:
        prefix, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, valid, n=1)
        if close:
            guess = f"{prefix}.{close[0]}" if prefix else close[0]
        else:  # a valid key in the wrong section (`tp:` at top level) deserves a pointer too
            guess = next((k for k in _all_keys() if k.rpartition(".")[2] == name), None)
        where = self.where(key)
        self.errors.append(f"unknown key {key!r}" + (f" in {where}" if where else "")
                           + (f"; did you mean {guess!r}?" if guess else ""))

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if data is None:  # `logging:` with every line commented out is an empty section
            data = {}
        if not isinstance(data, dict):
            self.error(prefix, f"{prefix or 'config'}: expected mapping, got {type(data).__name__} {data!r}")
            return _BAD
        fields = dataclasses.fields(cls)
        for key in data:
            if key not in _hints(cls):
                self.unknown(f"{prefix}.{key}" if prefix else str(key), [f.name for f in fields])
        kwargs = {}
        for f in fields:
            key = f"{prefix}.{f.name}" if prefix else f.name
            if f.name in data:
                kwargs[f.name] = self.value(_hints(cls)[f.name], data[f.name], key)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.error(key, f"missing required key {key!r}")
                kwargs[f.name] = _BAD
        return _BAD if any(v is _BAD for v in kwargs.values()) else cls(**kwargs)

    def value(self, tp: Any, v: Any, key: str) -> Any:
        if dataclasses.is_dataclass(tp):
            return self.section(tp, v, key)
        ok, converted = _check(tp, v)
        if ok:
            return converted
        expected = _type_name(tp)
        got = "null" if v is None else f"{type(v).__name__} {v!r}"
        hint = "; quote it to keep it a string" if expected.startswith("str") and v is not None else ""
        self.error(key, f"{key}: expected {expected}, got {got}{hint}")
        return _BAD


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        keys.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return tuple(keys)


def from_dict(data: dict, *, source: str | None = None, origins: dict[str, str] | None = None) -> Config:
    """Strictly convert a plain nested dict to `Config`; raises ConfigError listing every problem."""
    builder = _Builder(origins or {}, source)
    cfg = builder.section(Config, data, "")
    if builder.errors:
        raise ConfigError(builder.errors)
    return _arch_source(cfg, builder)


def _arch_source(cfg: Config, builder: _Builder) -> Config:
    """`model.size: from_checkpoint` reads the architecture from checkpoint.load unless model.arch_from names
    another folder; the path goes into the model section so every `resolve_arch(cfg.model)` can find it."""
    m = cfg.model
    if m.size != "from_checkpoint":
        if m.arch_from is not None:
            builder.error("model.arch_from", f"model.arch_from={m.arch_from!r} is only read with "
                                             f"model.size=from_checkpoint (model.size={m.size!r})")
            raise ConfigError(builder.errors)
        return cfg
    source = m.arch_from or cfg.checkpoint.load
    if source is None:
        builder.error("model.size", "model.size=from_checkpoint needs checkpoint.load (or model.arch_from): the "
                                    "checkpoint whose model.json gives the architecture")
        raise ConfigError(builder.errors)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, arch_from=source))


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    data, origins = _read(Path(path))
    extra, extra_origins = _overrides(overrides)
    return from_dict(_merge(data, extra), source=os.path.normpath(path), origins={**origins, **extra_origins})


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A copy of `cfg` with CLI-style overrides applied, through the same strict path."""
    extra, origins = _overrides(overrides)
    return from_dict(_merge(cfg.to_dict(), extra), origins=origins)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
