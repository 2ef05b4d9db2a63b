"""Command-line overrides of nested dataclass configs: ``--set objective.beta=0.2``.

Values are parsed by the type of the field they replace (bool accepts true/false/1/0, ``None``
accepts ``none``/``null``, and anything else is read as JSON when it parses, so lists and dicts work).
Unknown keys are errors that list the valid ones, except in a config that collects free-form
settings in a dict field it names in ``__extra_field__`` (an objective's hyperparameters, say). A
config whose ``__post_init__`` checks its values rejects a bad one as it is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def _parse(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else Any
    if annotation is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"`{key}` expects true or false, got {text!r}.")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError as error:
            raise ValueError(f"`{key}` expects {annotation.__name__}, got {text!r}.") from error
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    # Configs are frozen and hashable: a JSON list for a tuple field stays a tuple.
    return tuple(value) if origin is tuple and isinstance(value, list) else value


def apply_overrides(config: T, assignments: Iterable[str]) -> T:
    """Returns ``config`` with each ``"a.b.c=value"`` assignment applied (the input is unchanged)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"Override {assignment!r} must look like `field.subfield=value`.")
        config = _set(config, key.strip().split("."), text.strip(), key.strip())
    return config


def config_from_argv(default: T, description: str, argv: list[str] | None = None) -> T:
    """``default`` with the ``--set KEY=VALUE`` overrides of a script's command line (``argv``)."""
    parser = argparse.ArgumentParser(description=description)
    add_override_argument(parser)
    return apply_overrides(default, parser.parse_args(argv).overrides)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected in ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set objective.beta=0.2 (repeatable)",
    )


def _set(node: Any, path: list[str], text: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"Cannot set `{full_key}`: `{path[0]}` is inside a non-config value.")
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = path[0]
    extra = getattr(node, "__extra_field__", None)
    if name not in fields and extra is not None and len(path) == 1:
        return _replace(
            node, full_key, text, {extra: {**getattr(node, extra), name: _parse(text, Any, full_key)}}
        )
    if name not in fields:
        raise ValueError(f"Unknown config key `{full_key}`; `{name}` is not one of {sorted(fields)}.")
    current = getattr(node, name)
    if len(path) > 1:
        value = _set(current, path[1:], text, full_key)
    elif isinstance(current, dict) or dataclasses.is_dataclass(current):
        raise ValueError(
            f"`{full_key}` is a group of settings; set one of its fields, e.g. `{full_key}.<field>=...`."
        )
    else:
        hints = typing.get_type_hints(type(node))
        value = _parse(text, hints.get(name, Any), full_key)
    return _replace(node, full_key, text, {name: value})


def _replace(node: Any, full_key: str, text: str, changes: dict[str, Any]) -> Any:
    try:
        return dataclasses.replace(node, **changes)
    except ValueError as error:  # a config that checks itself (an online algorithm's section, say)
        raise ValueError(f"`{full_key}`={text!r}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) dataclass config, for writing the resolved config of a run."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
