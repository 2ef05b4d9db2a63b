"""Command-line overrides of nested dataclass configs: ``--set objective.beta=0.2``, and config files.

Values are parsed by the type of the field they replace (bool accepts true/false/1/0, ``None``
accepts ``none``/``null``, a tuple a JSON list or one bare string, and anything else is read as
JSON when it parses, so lists and dicts work). Unknown keys are errors that list the valid ones,
except in a config that collects free-form settings in a dict field it names in ``__extra_field__``
(an objective's hyperparameters, say). A config whose ``__post_init__`` checks its values rejects
a bad one as it is set.

A config file (:func:`load_settings`, YAML or JSON) holds the same keys nested, e.g.
``{"train": {"steps": 100}, "objective": {"beta": 0.5}}``; the output of ``--print-config``
(:func:`to_dict`) reads back as one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _parse(text: str, annotation: Any, key: str) -> Any:
    """The value of ``--set key=text`` for a field of type ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else Any
        origin = typing.get_origin(annotation)
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
        # `--set data.train_files=a.jsonl`: one file, not the characters of its name.
        return (text,) if origin is tuple else text
    return _coerce(value, annotation, key) if origin in (tuple, dict) else value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from a config file, or JSON of ``--set``) as a field of type ``annotation``, or a
    ValueError naming ``key``."""
    if isinstance(value, str):
        return _parse(value, annotation, key)  # the same spelling as on the command line
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        annotation = options[0] if len(options) == 1 else Any
        origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (int, float)}.get(annotation)
    if expected is not None:
        # bool is an int in Python; a config's 1 for a bool field, or true for a number, is a mistake.
        if isinstance(value, expected) and (annotation is bool or not isinstance(value, bool)):
            return annotation(value)
        raise ValueError(f"`{key}` expects {annotation.__name__}, got {value!r}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{key}` expects a list, got {value!r}.")
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if (origin or annotation) is dict and not isinstance(value, Mapping):
        raise ValueError(f"`{key}` expects a mapping of settings, got {value!r}.")
    return value


def apply_overrides(config: T, assignments: Iterable[str]) -> T:
    """Returns ``config`` with each ``"a.b.c=value"`` assignment applied (the input is unchanged)."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"Override {assignment!r} must look like `field.subfield=value`.")
        key, text = key.strip(), text.strip()
        config = _set(config, key.split("."), lambda annotation: _parse(text, annotation, key), key, text)
    return config


def apply_settings(config: T, settings: Mapping[str, Any], prefix: str = "") -> T:
    """Returns ``config`` with the nested ``settings`` (a config file's contents) applied: each
    section is a mapping, each value is typed and checked as an override of the same key."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"`{prefix.rstrip('.') or 'the config file'}` must be a mapping of settings.")
    for name, value in settings.items():
        key = f"{prefix}{name}"
        current = getattr(config, str(name), None)
        if (
            dataclasses.is_dataclass(config)
            and dataclasses.is_dataclass(current)
            and isinstance(value, Mapping)
        ):
            config = _replace(
                config, key, json.dumps(value), {name: apply_settings(current, value, f"{key}.")}
            )
        elif isinstance(current, dict) and isinstance(value, Mapping):  # hparams: merged, as `--set` does
            config = _replace(config, key, json.dumps(value), {name: {**current, **value}})
        else:
            shown = value if isinstance(value, str) else json.dumps(value)
            config = _set(config, [str(name)], lambda annotation: _coerce(value, annotation, key), key, shown)
    return config


def load_settings(path: str | pathlib.Path) -> dict[str, Any]:
    """The nested settings of a YAML (``.yaml``/``.yml``) or JSON config file."""
    path = pathlib.Path(path)
    text = path.read_text()  # FileNotFoundError names the path
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); YAML files end in .yaml or .yml."
            ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a mapping of settings, e.g. `train: {{steps: 100}}`.")
    return settings


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


def _set(node: Any, path: list[str], convert: Callable[[Any], Any], full_key: str, shown: str) -> Any:
    """``node`` with the field at ``path`` set to ``convert(its type annotation)``."""
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"Cannot set `{full_key}`: `{path[0]}` is inside a non-config value.")
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = path[0]
    extra = getattr(node, "__extra_field__", None)
    if name not in fields and extra is not None and len(path) == 1:
        return _replace(node, full_key, shown, {extra: {**getattr(node, extra), name: convert(Any)}})
    if name not in fields:
        raise ValueError(f"Unknown config key `{full_key}`; `{name}` is not one of {sorted(fields)}.")
    current = getattr(node, name)
    if len(path) > 1:
        value = _set(current, path[1:], convert, full_key, shown)
    elif isinstance(current, dict) or dataclasses.is_dataclass(current):
        raise ValueError(
            f"`{full_key}` is a group of settings; set one of its fields, e.g. `{full_key}.<field>=...`."
        )
    else:
        value = convert(typing.get_type_hints(type(node)).get(name, Any))
    return _replace(node, full_key, shown, {name: value})


def _replace(node: Any, full_key: str, shown: str, changes: dict[str, Any]) -> Any:
    try:
        return dataclasses.replace(node, **changes)
    except ValueError as error:  # a config that checks itself (configs.py, an online algorithm's section)
        message, own = str(error), f"`{full_key.rpartition('.')[2]}`="
        if message.startswith(own):  # "`steps`=0 must be ..." -> "`train.steps`=0 must be ..."
            raise ValueError(f"`{full_key}`={message[len(own) :]}") from None
        raise ValueError(f"`{full_key}`={shown!r}: {message}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) dataclass config, for writing the resolved config of a run."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
