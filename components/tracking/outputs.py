"""Typed stage outputs: declared once per stage, stored on its MLflow run, read back with their
types.

A stage's outputs are a frozen dataclass deriving from :class:`StageOutputs` whose fields are
plain JSON types (``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``dict[str, ...]``).
The runner writes them to the run as ``outputs.json`` (the copy it reads back) and, for the
MLflow UI and ``search_runs``, as one ``moeops.out.<field>`` tag per field. Reading checks
every field against its declared type, so a downstream stage never guesses a key or parses a
number back from a string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="StageOutputs")


class OutputsError(ValueError):
    """Recorded outputs that do not match the declared dataclass (missing field, wrong type)."""


def digest_of(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (stable across processes, unlike ``hash``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StageOutputs:
    """Base of every stage's outputs. Subclasses set ``stage`` and declare fields."""

    stage: ClassVar[str] = ""

    def cache_digest(self) -> str:
        """What downstream cache keys hold for these outputs (default: every field).

        Stages whose outputs have a content digest (the dataset's, the weights') override this,
        so that an identical result recomputed elsewhere still lets downstream stages be reused.
        """
        return digest_of(self.to_json())

    def headline(self) -> str:
        """One line for the pipeline summary."""
        return ""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def tags(self) -> dict[str, str]:
        """Per-field string forms for MLflow tags (display and search only; never read back)."""
        return {
            name: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for name, value in self.to_json().items()
        }

    @classmethod
    def schema(cls) -> dict[str, str]:
        """Field name -> declared type, as text (recorded on runs to find compatible ones)."""
        hints = typing.get_type_hints(cls)
        return {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(cls)}

    @classmethod
    def schema_digest(cls) -> str:
        return digest_of({"stage": cls.stage, "fields": cls.schema()})[:16]

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise OutputsError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise OutputsError(
                f"{cls.__name__}: recorded outputs do not match the declaration "
                f"(missing: {missing or 'none'}; unknown: {unknown or 'none'})"
            )
        return cls(**{n: _coerce(hints[n], data[n], f"{cls.__name__}.{n}") for n in names})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{getattr(origin, '__name__', str(origin))}[{args}]"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from JSON) as ``tp``; raises :class:`OutputsError` when it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is float:
        # JSON has one number type: an integral float may come back as an int.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, list):
            items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        _, item = typing.get_args(tp) or (str, Any)
        if isinstance(value, dict):
            return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    else:
        raise OutputsError(f"{where}: unsupported declared type {tp!r} (use JSON types)")
    raise OutputsError(f"{where}={value!r}: expected {_type_name(tp)}")


def finite_or_none(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
