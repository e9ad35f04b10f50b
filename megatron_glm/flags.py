"""Command-line flags made from settings dataclasses: a default, a type and a help text written once.

A field made with ``setting`` carries its default and a one-line help; its flag is the field's
name in Megatron's spelling (``--micro-batch-size`` for ``micro_batch_size``) unless ``name``
gives another (``--bert-prob`` for the objective's ``token_prob``); a field made with
``internal`` has none. ``add_flags`` turns a
dataclass into an argparse group; ``read_flags`` turns parsed flags back into the dataclass,
from an argparse namespace or from a dict of the same names (a checkpoint's recorded flags).
The type comes from the annotation: ``bool`` is a switch, ``X | None`` an optional ``X``,
``tuple[X, ...]`` one or more values; per-field metadata holds the exceptions, as Megatron's
``ArgumentGroupFactory`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

_KEY = "flag"
MISSING = dataclasses.MISSING
UNSET = object()  # Flag.parser_default when the parser holds the field's own default


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field appears on the command line."""

    help: str | None = None
    name: str | None = None  # the flag when it is not ``--field-name``
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    metavar: Any = None
    # a bool field its flag sets False (``--no-load-optim`` for ``load_optim``)
    negate: bool = False
    type: Callable | None = None  # an argparse type other than the annotation's
    nargs: Any = None  # an exact count (3) rather than one or more
    # what the parser holds when the flag is absent, where the field's default is filled in later
    # from something else (a preset; the data-parallel size): the help says what
    parser_default: Any = UNSET
    hidden: bool = False  # accepted, not listed (the launchers' --local_rank)
    required: bool = False


def setting(default: Any = MISSING, help: str | None = None, **flag) -> Any:
    """A dataclass field with its default and its flag (``Flag``'s keywords)."""
    return dataclasses.field(default=default, metadata={_KEY: Flag(help=help, **flag)})


def internal(default: Any = MISSING) -> Any:
    """A field with no flag: filled in by the code (the padded vocabulary) or a fixed choice of the method."""
    return dataclasses.field(default=default, metadata={_KEY: None})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get(_KEY) if _KEY in field.metadata else Flag()


def option(field: dataclasses.Field) -> str:
    """The field's flag, e.g. ``--micro-batch-size``."""
    spec = flag_of(field)
    return spec.name if spec and spec.name else "--" + field.name.replace("_", "-")


def dest(field: dataclasses.Field) -> str:
    """Where argparse puts the flag's value: Megatron's attribute name (``no_load_optim``)."""
    return option(field).lstrip("-").replace("-", "_")


def _unwrap(hint) -> Any:
    """The type inside ``X | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def flagged_fields(cls) -> list[tuple[dataclasses.Field, Flag, Any]]:
    """(field, flag, resolved type) for every field of ``cls`` that has a flag."""
    hints = typing.get_type_hints(cls)
    return [
        (f, flag_of(f), hints[f.name]) for f in dataclasses.fields(cls) if flag_of(f) is not None
    ]


def add_flags(group, cls, exclude: tuple[str, ...] = ()) -> None:
    """One argparse argument per flagged field of ``cls`` (but the fields named in ``exclude``), in a parser or
    one of its groups."""
    for field, spec, hint in flagged_fields(cls):
        if field.name in exclude:
            continue
        kind = _unwrap(hint)
        default = field.default if spec.parser_default is UNSET else spec.parser_default
        kw: dict[str, Any] = {
            "dest": dest(field),
            "help": argparse.SUPPRESS if spec.hidden else spec.help,
        }
        if spec.required:
            kw["required"] = True
        elif default is not MISSING:
            kw["default"] = list(default) if isinstance(default, tuple) else default
        # a switch; a negated one keeps Megatron's name and meaning (no_load_optim: do not load)
        if kind is bool:
            kw.update(action="store_true", default=False)
        else:
            element = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
            kw["type"] = spec.type or element
            if typing.get_origin(kind) is tuple:
                kw["nargs"] = spec.nargs or "+"
            if spec.choices is not None:
                kw["choices"] = list(spec.choices)
            if spec.metavar is not None:
                kw["metavar"] = spec.metavar
        group.add_argument(option(field), *spec.aliases, **kw)


def value_of(values, name: str, default: Any = None) -> Any:
    """One parsed flag by its argparse name, from a namespace or a dict of the same names."""
    return values.get(name, default) if isinstance(values, dict) else getattr(values, name, default)


def flag_values(cls, values) -> dict[str, Any]:
    """``{field: value}`` of ``cls``'s flags among parsed flags: an argparse namespace, or a dict of the
    same names (the flags a checkpoint recorded; a name it lacks is left out)."""
    out = {}
    for field, spec, _ in flagged_fields(cls):
        value = value_of(values, dest(field), MISSING)
        if value is MISSING:
            continue
        if spec.negate:
            value = not value
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[field.name] = value
    return out


def read_flags(cls, values, **fixed):
    """``cls`` from parsed flags (``flag_values``); ``fixed``: fields without a flag, or set otherwise."""
    return cls(**{**flag_values(cls, values), **fixed})
