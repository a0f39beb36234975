"""A dataclass-driven command line (cleanrl's ``Args`` style, without a third-party parser).

``parse(Args)`` builds an ``argparse`` parser from a (possibly nested) dataclass: each field becomes
``--name`` (nested ones ``--group.name``), its type gives the conversion, a ``Literal`` (or a
callable under ``field(metadata={"choices": ...})``, for choices a registry holds) gives the
choices, and the string literal written under the field (its docstring) becomes the ``--help``
text, so the help can never drift from the config. Values are validated by the dataclasses'
own ``__post_init__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (its own and its dataclass bases') to the docstring
    written right below it."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field, parent: Any) -> Any:
    if parent is not None:
        return getattr(parent, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} needs a default to become a command-line option")


def _flag_prefixes(f: dataclasses.Field, flag: str, old: str | None) -> tuple[str, str | None]:
    """The option prefixes of nested dataclass field ``f`` under a parent spelt ``flag`` (and, for
    a deprecated spelling, ``old``): a field marked ``metadata={"flatten": True}`` puts its
    fields directly under the parent (``--world.w-max`` for ``world.context.w_max``), its nested
    spelling kept as a deprecated alias."""
    if f.metadata.get("flatten"):
        return flag, f"{flag}{f.name}."
    return f"{flag}{f.name}.", (f"{old}{f.name}." if old is not None else None)


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str,
    defaults: Any = None,
    flag_prefix: str | None = None,
    old_prefix: str | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """Add one option per leaf field; ``defaults`` is the instance whose values are the defaults.
    ``flag_prefix`` spells the options (default ``prefix``, the destination's path); a deprecated
    spelling under ``old_prefix`` is accepted too and recorded in ``aliases`` (old -> new)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    flag_prefix = prefix if flag_prefix is None else flag_prefix
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _default(f, defaults)
        if dataclasses.is_dataclass(tp):
            flags, old = _flag_prefixes(f, flag_prefix, old_prefix)
            _add_fields(parser, tp, f"{prefix}{f.name}.", default, flags, old, aliases)
            continue
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": default}
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kinds = typing.get_args(tp)  # tuple[int, ...] takes any number of values
            kwargs["nargs"] = "*" if kinds[-1] is Ellipsis else len(kinds)
            kwargs["type"] = kinds[0]
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        else:
            kwargs["type"] = tp
        if "choices" in f.metadata:  # choices known only at run time (a registry): a callable
            kwargs["choices"] = list(f.metadata["choices"]())
        flag = f"--{flag_prefix}{f.name}".replace("_", "-")
        names = [flag]
        if old_prefix is not None:
            names.append(f"--{old_prefix}{f.name}".replace("_", "-"))
            if aliases is not None:
                aliases[names[1]] = flag
        if old_prefix is not None and "choices" not in kwargs and tp is not bool:
            kwargs["metavar"] = f"{flag_prefix}{f.name}".upper()  # the current spelling's
        parser.add_argument(*names, help=f"{help_text} (default: {default})", **kwargs)


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, f"{key}.")
        else:
            kwargs[f.name] = tuple(values[key]) if typing.get_origin(tp) is tuple else values[key]
    return cls(**kwargs)


def parse(
    cls: type[T],
    argv: list[str] | None = None,
    description: str | None = None,
    defaults: T | None = None,
) -> T:
    """Parse ``argv`` into an instance of dataclass ``cls`` (nested dataclasses become groups);
    ``defaults`` (an instance) replaces the class's own defaults."""
    parser = argparse.ArgumentParser(
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0]
    )
    aliases: dict[str, str] = {}
    _add_fields(parser, cls, "", defaults, aliases=aliases)
    for arg in sys.argv[1:] if argv is None else argv:
        old = arg.split("=", 1)[0]
        new = aliases.get(old) or aliases.get(old.replace("--no-", "--", 1))
        if new is not None:
            print(f"note: {old} is spelt {new} now (the old spelling still works)",
                  file=sys.stderr)
    try:
        return _build(cls, vars(parser.parse_args(argv)))
    except ValueError as err:  # a dataclass's __post_init__ refused a value: exit 2 with usage
        parser.error(str(err))


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass instance."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """The instance of dataclass ``cls`` that ``to_dict`` wrote as ``values`` (nested dataclasses
    from nested dicts, lists back to tuples); a field missing from ``values`` takes its default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp, value = hints[f.name], values[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value)
        else:
            kwargs[f.name] = tuple(value) if typing.get_origin(tp) is tuple else value
    return cls(**kwargs)


def to_argv(obj: Any, prefix: str = "", default: Any = None) -> list[str]:
    """The command-line options that ``parse`` turns back into ``obj``: one per leaf field whose
    value differs from its default (``default``, else the class's; nested dataclasses compared field
    by field with the parent's default for them), in their current spelling."""
    out: list[str] = []
    default = type(obj)() if default is None else default
    for f in dataclasses.fields(obj):
        value, base = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += to_argv(value, _flag_prefixes(f, prefix, None)[0], base)
            continue
        if value == base:
            continue
        flag = f"--{prefix}{f.name}".replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{prefix}{f.name}".replace("_", "-"))
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def versions() -> dict:
    """What a run folder records of the software and machine it ran on (versions.json and the
    results' 'versions')."""
    import importlib.metadata as md
    import platform

    import numpy as np
    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "gymnasium": version("gymnasium"),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_cli(
    cls: type[T],
    fn,
    argv: list[str] | None = None,
    errors: tuple[type[BaseException], ...] = (ValueError,),
    defaults: T | None = None,
):
    """Every entry point's ``main``: parse ``argv`` into ``cls`` (``parse``), call ``fn`` with it,
    and turn an expected error (``errors``: bad input the message names) into 'error: <message>'
    and exit status 1, without a traceback. Returns (the arguments, what ``fn`` returned)."""
    args = parse(cls, argv, defaults=defaults)
    try:
        return args, fn(args)
    except errors as err:
        raise SystemExit(f"error: {err}") from err
