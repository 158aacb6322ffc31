"""Command options as dataclasses: one field = one flag, its help in the field, its default shown from the field.

A command's config (TrainConfig, SFTConfig, GRPOConfig, ...) is a dataclass of its own fields plus shared
*pieces* (OptimConfig, RuntimeConfig, ...) that several commands compose, each with the command's own defaults:

    @flat_init
    @dataclass(slots=True)
    class SFTConfig:
        epochs: float = option(2.0, help="passes over the data")
        optim: OptimConfig = piece(OptimConfig, lr=5e-5, warmup=10)

The command line is flat: `--lr`, not `--optim.lr`, so every flag name (a field name with '-' for '_') is unique
within a command. The same flat names work in three more places: keyword arguments (`SFTConfig(lr=1e-4)`, as
`flat_init` makes the constructor take them), a run.json written before the pieces existed, and `--config`
files. `add_flags` writes the argparse block from the fields, so the help text and the default a user reads can
not drift from what the code does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import MISSING, Field, field
from pathlib import Path
from typing import Any


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, choices: tuple | None = None,
           unset: str | None = None, nargs: str | None = None, aliases: tuple[str, ...] = (),
           positional: bool = False, required: bool = False) -> Any:
    """A field that is a flag. `help` says what it does, without the default: that is rendered from the field.
    `unset` words what the field's None / empty / 0 value means ("torch's choice"), shown when that is the
    default; `choices` are checked by `check` and by argparse; `positional` fields are arguments without dashes."""
    meta = {"help": help, "choices": choices, "unset": unset, "nargs": nargs, "aliases": aliases,
            "positional": positional, "required": required}
    return field(default=default, default_factory=default_factory, metadata=meta)


def piece(cls: type, **defaults: Any) -> Any:
    """A shared piece composed into a command's config, with this command's defaults where they differ."""
    return field(default_factory=lambda: cls(**defaults), metadata={"piece": cls})


def check(obj: Any) -> None:
    """Validate the fields with `choices` (a __post_init__ calls it): the error names the field and the value."""
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if allowed and value is not None and value not in allowed:
            raise ValueError(f"{f.name}={value!r} must be one of {allowed}")


def positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name}={getattr(obj, name)!r} must be positive")


# ---- the flat view of a config ---------------------------------------------------------------------------
def flat_fields(cls: type) -> list[tuple[Field, Any]]:
    """Every flag of a command config: (field, the command's default) for its own fields, then each piece's
    fields with the defaults of the command's piece. Raises if two share a flat name."""
    out = []
    for f in dataclasses.fields(cls):
        if "piece" in f.metadata:
            default_piece = f.default_factory()
            out += [(g, getattr(default_piece, g.name)) for g in dataclasses.fields(default_piece)]
        else:
            out.append((f, f.default if f.default is not MISSING else
                        f.default_factory() if f.default_factory is not MISSING else MISSING))
    names = [f.name for f, _ in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: flat names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def _pieces(cls: type) -> dict[str, Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "piece" in f.metadata}


def nest(cls: type, values: dict) -> dict:
    """Flat keys -> cls's constructor arguments: each piece's keys gathered into that piece (the command's default
    piece, replaced where given). A piece may also come whole, as an instance or as a dict (a run.json)."""
    pieces = _pieces(cls)
    owner = {g.name: name for name, f in pieces.items() for g in dataclasses.fields(f.metadata["piece"])}
    own = {f.name for f in dataclasses.fields(cls)}
    out, parts = {}, {}
    for key, value in values.items():
        if key in own:
            out[key] = value
        elif key in owner:
            parts.setdefault(owner[key], {})[key] = value
        else:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
    for name, f in pieces.items():
        given = out.get(name)
        if isinstance(given, dict) or name in parts:
            base = given if given is not None and not isinstance(given, dict) else f.default_factory()
            changes = {**(given if isinstance(given, dict) else {}), **parts.get(name, {})}
            out[name] = dataclasses.replace(base, **changes)
    return out


def flat_init(cls: type) -> type:
    """Class decorator (above @dataclass): the constructor also takes the pieces' fields by their flat names,
    `TrainConfig(lr=1e-3)` = `TrainConfig(optim=OptimConfig(lr=1e-3))` with TrainConfig's other optim defaults."""
    generated = cls.__init__

    def __init__(self, **values):
        generated(self, **nest(cls, values))

    __init__.__doc__ = generated.__doc__
    cls.__init__ = __init__
    return cls


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"


def read_config(cls: type, path: str | Path) -> dict:
    """A JSON file of cls's fields -> flat values: the nested layout this module writes, or a run.json written
    before the pieces existed (every key flat)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if values is None:
        raise FileNotFoundError(f"{path}: --config file not found")
    flat = {}
    for key, value in values.items():
        flat.update(value if key in _pieces(cls) and isinstance(value, dict) else {key: value})
    known = {f.name for f, _ in flat_fields(cls)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} field(s) {unknown}")
    return flat


# ---- argparse ---------------------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def help_text(f: Field, default: Any) -> str:
    """The field's help with its default: '(default 0.003)'; where the default is None, empty or 0 and that means
    something, its `unset` words: '(default: torch's choice)', '(default 0: the preset's)'."""
    meta = f.metadata
    if meta["positional"] or meta["required"]:
        return meta["help"]
    unset = meta["unset"] if not isinstance(default, bool) and not default else None
    if default is None or default == [] or default == "":
        if unset is None:
            raise TypeError(f"{f.name}: a default of {default!r} needs `unset` words in its option()")
        return f"{meta['help']} (default: {unset})"
    return f"{meta['help']} (default {_shown(default)}{': ' + unset if unset else ''})"


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per flat field of cls. Flags left out parse as None (or are absent), so `from_args`
    takes only what the user gave and the config's own defaults fill the rest."""
    for f, default in flat_fields(cls):
        meta = f.metadata
        kw: dict[str, Any] = {"help": help_text(f, default)}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["nargs"]:
            kw["nargs"] = meta["nargs"]
        if isinstance(default, bool) or default is None and _is_bool(f):
            kw["action"] = argparse.BooleanOptionalAction
        elif not meta["nargs"]:
            kw["type"] = _scalar_type(f, default)
        if meta["positional"]:
            parser.add_argument(f.name, **kw)
        else:
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, *meta["aliases"], dest=f.name, required=meta["required"], **kw)


def _type_name(f: Field) -> str:
    """'int', 'float | None', ...: the annotation as written (these modules use postponed annotations)."""
    return (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" ", "")


def _is_bool(f: Field) -> bool:
    return _type_name(f) == "bool|None"


def _scalar_type(f: Field, default: Any):
    t = _type_name(f)
    for name, conv in (("int", int), ("float", float)):
        if t in (name, f"{name}|None"):
            return conv
    if t in ("str", "str|None"):
        return str
    raise TypeError(f"{f.name}: no flag type for {f.type!r} (default {default!r})")


def from_args(cls: type, args: argparse.Namespace, base: dict | None = None):
    """cls from `base` (flat values, e.g. read_config's) overridden by the flags given on the command line."""
    values = dict(base or {})
    for f, _ in flat_fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return cls(**values)
