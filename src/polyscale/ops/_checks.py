"""Argument checks shared by the operators: each raises ValueError naming the argument and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """`value` as an int; ValueError unless it is an integer >= 1 (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (1, 2, 3, ...), got {value!r}")
    return value


def odd_kernel(name: str, value: Any) -> int:
    """A square kernel size given as k or (k, k): positive and odd, so that it has a centre tap."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an odd int k or a square pair (k, k), got {value!r}")
        value = value[0]
    k = positive_int(name, value)
    if k % 2 == 0:
        raise ValueError(
            f"{name} must be odd (1, 3, 5, ...) so every dilation shares the centre tap, got {k}"
        )
    return k


def int_pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair (nn.Conv2d's stride / padding convention)."""
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value, value)
    ok = len(values) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
    )
    if not ok:
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return values  # type: ignore[return-value]


def divides(name: str, groups: int, **channels: int) -> None:
    """ValueError unless `groups` divides every channel count given."""
    for channel_name, count in channels.items():
        if count % groups:
            raise ValueError(f"{name}={groups} must divide {channel_name}={count}; use a divisor of {count}")


def int_sequence(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty list/tuple of positive ints."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {value!r}")
    return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))
