"""Command-line arguments derived from config dataclasses, so ``--help`` is the documentation.

Every field of a config dataclass becomes ``--field-name``; its help text is the field's
docstring (the string literal written under the field) followed by its default. A field
whose type is itself a dataclass contributes its own fields under a prefix
(``--sae-k`` for field ``k`` of field ``sae``). Values the user did not pass are left to the
dataclass defaults, and the dataclass ``__post_init__`` does the validation; its
``ValueError`` becomes an argparse error (exit code 2, one line, no traceback).

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--x`` / ``--no-x``),
``Literal[...]`` (choices), ``X | None`` (pass ``none`` for None), ``tuple[X, ...]`` and
``list[X]`` (space-separated values), and nested dataclasses.

What it leaves out: the subcommands themselves (``commands``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, Union

NONE_WORDS = ("none", "None", "null")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of the fields of dataclass ``cls`` (and its dataclass bases), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined interactively: no source to read docs from
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for stmt, following in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp} for a command-line field")
    return tp, False


def _parser_for(tp: Any, optional: bool) -> Any:
    """A callable turning one command-line word into a value of type ``tp``."""

    def convert(word: str) -> Any:
        if optional and word in NONE_WORDS:
            return None
        if tp is bool:
            lowered = word.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {word!r}")
        try:
            return tp(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {word!r}") from None

    convert.__name__ = getattr(tp, "__name__", str(tp))  # argparse names the type in errors
    return convert


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _show_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value) or "(empty)"
    return f"default: {value if value != '' else repr(value)}"


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    exclude: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """Add one option per field of dataclass ``cls`` (recursing into nested dataclasses).

    ``exclude`` names fields the command fills in itself (e.g. ``d_in``, read from the data);
    a field without a default that is not excluded becomes a required option.
    Values land in the namespace under ``prefix + name`` (``"sae_k"``), and options the
    user did not pass are absent from the namespace, so the dataclass default applies.
    """
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group(title or f"{cls.__name__} options", _first_line(cls))
    else:
        group = parser
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix=f"{prefix}{field.name}_")
            continue
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        help_text = f"{docs.get(field.name, '')} ({_show_default(field)})".strip()
        kwargs: dict[str, Any] = {"dest": prefix + field.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool and not optional:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = typing.get_args(tp)
            kwargs.update(type=_parser_for(type(choices[0]), optional), choices=choices + ((None,) if optional else ()))
            kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        elif origin in (tuple, list):
            item = typing.get_args(tp)[0]
            kwargs.update(type=_parser_for(item, False), nargs="*", metavar=item.__name__.upper())
        elif tp in (int, float, str, bool):
            kwargs.update(type=_parser_for(tp, optional), metavar=tp.__name__.upper())
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: type {tp} has no command-line form")
        group.add_argument(_flag(prefix, field.name), required=required, **kwargs)


def _first_line(cls: type) -> str | None:
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc and not doc.startswith(cls.__name__ + "(") else None


def dataclass_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **given: Any) -> Any:
    """Build ``cls`` from the options ``add_dataclass_arguments`` added, plus ``given`` values.

    ``given`` (e.g. ``d_in=576`` read from the data) fills the fields the command excluded
    or chooses itself; an option the user passed wins over ``given``, which wins over the
    dataclass default.
    """
    values = vars(args)
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp, _ = _unwrap_optional(hints[field.name])
        if dataclasses.is_dataclass(tp) and field.name not in given:
            kwargs[field.name] = dataclass_from_args(tp, args, prefix=f"{prefix}{field.name}_")
        elif prefix + field.name in values:
            value = values[prefix + field.name]
            kwargs[field.name] = tuple(value) if typing.get_origin(tp) is tuple else value
        elif field.name in given:
            kwargs[field.name] = given[field.name]
    return cls(**kwargs)


def explicit_fields(cls: type, args: argparse.Namespace, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` the user actually passed, as a flat ``{name: value}`` dict."""
    values = vars(args)
    return {f.name: values[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in values}
