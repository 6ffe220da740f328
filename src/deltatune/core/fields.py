"""Config fields that carry their documentation and allowed range, and the one check of them.

Every config dataclass (a method's, the run's sections, a comparison's) declares its fields
with :func:`help_field`; :func:`check_fields` checks types, then ranges, before anything runs,
and its error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

#: the range of every seed field: what numpy accepts as a seed (32 bits)
SEEDS = "[0, 4294967295]"


@dataclass(frozen=True)
class Range:
    """The numbers a field allows, written as an interval: ``"[1, inf)"`` (1 or more),
    ``"(0, inf)"``, ``"[0, 1)"``, ``"[2, 100]"``. NaN is in no range, and an infinity only
    where the interval closes on it (``"[0, inf]"``)."""

    low: float
    high: float
    open_low: bool
    open_high: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        match = re.fullmatch(r"([\[(])\s*([-+.\w]+)\s*,\s*([-+.\w]+)\s*([\])])", text)
        if not match:
            raise ValueError(f"range {text!r} is not an interval such as '[0, 1)'")
        left, low, high, right = match.groups()
        low, high = (int(t) if t.lstrip("-").isdigit() else float(t) for t in (low, high))  # "1", not "1.0", in words
        return cls(low, high, left == "(", right == ")")

    def __contains__(self, x: float) -> bool:  # False for NaN, as every comparison with NaN is
        return ((self.low < x or (x == self.low and not self.open_low))
                and (x < self.high or (x == self.high and not self.open_high)))

    def __str__(self) -> str:  # "at least 1", "greater than 0 and below 1", "from 2 to 100"
        low = f"{'greater than' if self.open_low else 'at least'} {self.low}" if self.low != -math.inf else ""
        high = f"{'below' if self.open_high else 'at most'} {self.high}" if self.high != math.inf else ""
        if low and high and not (self.open_low or self.open_high):
            return f"from {self.low} to {self.high}"
        return " and ".join(w for w in (low, high) if w) or "a finite number"


FINITE = Range.parse("(-inf, inf)")


def help_field(default: Any, help: str, range: str | None = None, typical: Any = None) -> Any:
    """A dataclass field with its documentation beside it (shown by ``deltatune methods``).

    Args:
        range: the numbers the field allows, as a :class:`Range` interval (``"[1, inf)"``);
            checked by :func:`check_fields`, for a list field on each item. Any float field is
            finite, range or not.
        typical: the value an out-of-range error suggests (default: ``default``).
    """
    metadata = {"help": help, "range": Range.parse(range) if range else None,
                "typical": default if typical is None else typical}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(config: Any, where: str) -> None:
    """Check each field of a config dataclass: its type, then the range declared with it.

    Raises:
        ConfigError: naming ``<where>.<key>``, the value and the type or range allowed.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        check_value(f, hints[f.name], getattr(config, f.name), f"{where}.{f.name}" if where else f.name)


def check_value(f: dataclasses.Field, tp: Any, value: Any, key: str) -> None:
    """One value of field ``f`` (of type ``tp``), named ``key`` in the error."""
    if not type_ok(value, tp):
        raise ConfigError(f"{key} = {value!r} has the wrong type.", f"expected {type_name(tp)}.")
    allowed = f.metadata.get("range") or FINITE
    many = isinstance(value, (list, tuple))
    numbers = [v for v in (value if many else [value]) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if all(v in allowed for v in numbers):
        return
    infinite = any(isinstance(v, float) and not math.isfinite(v) for v in numbers)
    rule = f"a finite number {allowed}" if infinite and allowed != FINITE else str(allowed)
    typical = f.metadata.get("typical")
    raise ConfigError(f"{key} = {value!r} is out of range: {'each item ' if many else ''}must be {rule}.",
                      f"e.g. {f.name}: {typical}." if typical is not None else f"leave {f.name} unset (null).")


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:  # a tuple passed from Python reads as a list
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):  # int, not "<class 'int'>"
        return tp.__name__
    return str(tp).replace("typing.", "")
