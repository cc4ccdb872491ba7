"""Typed method configs: dataclasses whose fields carry help text and units.

A field's ``metadata`` may hold ``help`` (one sentence), ``unit`` and ``choices``. The CLI
lists these under ``--help`` and :func:`build_config` turns ``key=value`` strings into a
config, with errors that name the key, the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from labhooks.errors import ConfigError


def option(default: Any, help: str, unit: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a config field with its default, help sentence, unit and allowed values."""
    metadata = {"help": help, "unit": unit, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One config field as the CLI shows it."""

    name: str
    type_name: str
    default: Any
    help: str
    unit: str | None
    choices: tuple[str, ...] | None


def _resolved_types(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names)
    if origin is list:
        (inner,) = typing.get_args(annotation) or (str,)
        return f"list of {_type_name(inner)}"
    return getattr(annotation, "__name__", str(annotation))


def fields_of(config_class: type) -> list[FieldInfo]:
    """List the fields of a config dataclass with their help, unit and choices."""
    hints = _resolved_types(config_class)
    infos = []
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        annotation = hints[field.name]
        choices = field.metadata.get("choices")
        if choices is None and typing.get_origin(annotation) is Literal:
            choices = tuple(str(v) for v in typing.get_args(annotation))
        infos.append(
            FieldInfo(field.name, _type_name(annotation), default, field.metadata.get("help", ""), field.metadata.get("unit"), choices)
        )
    return infos


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, text: Any, annotation: Any) -> Any:
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        last_error: ConfigError | None = None
        for argument in arguments:
            try:
                return _convert(name, text, argument)
            except ConfigError as error:
                last_error = error
        assert last_error is not None
        raise last_error
    if origin is Literal:
        allowed = [str(v) for v in typing.get_args(annotation)]
        if text not in allowed:
            raise ConfigError(f"invalid value {text!r} for {name}: choose one of {', '.join(allowed)}")
        return text
    if origin is list:
        (inner,) = typing.get_args(annotation) or (str,)
        items = [item.strip() for item in text.split(",") if item.strip()]
        return [_convert(name, item, inner) for item in items]
    if annotation is bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"invalid value {text!r} for {name}: expected true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            expected = "an integer" if annotation is int else "a number"
            # The CLI reads a bare --flag as flag=true, so this value usually means a forgotten number.
            hint = f"; --{name.replace('_', '-')} without a value reads as true, so write {name}=VALUE" if text == "true" else ""
            raise ConfigError(f"invalid value {text!r} for {name}: expected {expected}{hint}") from None
    return text


def build_config(config_class: type, values: Mapping[str, Any]) -> Any:
    """Build a config from a mapping of strings or values, checking every key and value.

    Dashes in keys are read as underscores, so ``max-new-tokens`` and ``max_new_tokens``
    are the same key.
    """
    hints = _resolved_types(config_class)
    known = {field.name: field for field in dataclasses.fields(config_class)}
    converted = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown option {raw_key!r}; {hint}valid options are {', '.join(sorted(known))}")
        converted[key] = _convert(key, value, hints[key])
        choices = known[key].metadata.get("choices")
        if choices and converted[key] is not None:
            chosen = converted[key] if isinstance(converted[key], list) else [converted[key]]
            for item in chosen:
                if str(item) not in choices:
                    raise ConfigError(f"invalid value {item!r} for {key}: choose one of {', '.join(choices)}")
    try:
        config = config_class(**converted)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid configuration for {config_class.__name__}: {error}") from None
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a config dataclass as JSON-ready values."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else dict(config)
