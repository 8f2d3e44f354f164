"""Declarative checks of the values a spec file (or a stored spec) holds: one Rule per key.

A key joins by adding a row to a table (``contract.RECIPE_RULES`` for ``[train]``,
``spec.TOP_RULES``, ``spec.SEARCH_RULES``); the same rule then checks the value in ``[train]``,
both ends of a search range and every search choice. Nothing heavy is imported.

    >>> Rule(float, gt=0).problem(0)
    'must be a number > 0, got 0'
    >>> try:
    ...     check_distribution("epochs", {"low": 1, "high": 5, "step": 0}, Rule(int, ge=1))
    ... except BadValue as e:
    ...     print(e)
    step must be an integer > 0, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class BadValue(ValueError):
    """A value its rule refuses: ``key`` (when known) and ``problem`` (what is wrong, what is allowed)."""

    def __init__(self, problem: str, key: str | None = None):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.problem, self.key = problem, key


@dataclass(frozen=True)
class Rule:
    """What one key accepts: a type, optional bounds (``gt``: strictly greater), choices, None."""

    kind: type  # int, float, bool or str; an int is accepted where a float is asked for
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None (or leaving the key out) means "no limit"
    also: tuple[str, ...] = ()  # words accepted besides values of ``kind`` (checkpoint_every = "epoch")

    def describe(self) -> str:
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.choices:
            return f"one of: {', '.join(map(str, self.choices))}"
        bounds = [
            f"{op} {v:g}"
            for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if v is not None
        ]
        return " ".join([what, " and ".join(bounds)]).strip() + "".join(f' or "{w}"' for w in self.also)

    def problem(self, value: Any) -> str | None:
        """None when the value is acceptable, else what is wrong with it."""
        if value is None and self.optional:
            return None
        if isinstance(value, str) and value in self.also:
            return None
        if self.choices:
            return (
                None
                if value in self.choices and _same_type(value, self.kind)
                else f"unknown value {value!r}; {self.describe()}"
            )
        if not _same_type(value, self.kind):
            return f"must be {self.describe()}, got {value!r}"
        if self.kind in (int, float):
            if not math.isfinite(value):
                return f"must be a finite number, got {value!r}"
            if (
                (self.ge is not None and value < self.ge)
                or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)
                or (self.lt is not None and value >= self.lt)
            ):
                return f"must be {self.describe()}, got {value!r}"
        return None

    def check(self, value: Any) -> None:
        problem = self.problem(value)
        if problem is not None:
            raise BadValue(problem)


def _same_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_table(values: dict[str, Any], rules: dict[str, Rule], what: str = "key") -> None:
    """Raise BadValue naming the first unknown key or refused value of ``values``."""
    for key, value in values.items():
        rule = rules.get(key)
        if rule is None:
            raise BadValue(f"unknown {what}; allowed: {', '.join(rules)}", key)
        problem = rule.problem(value)
        if problem is not None:
            raise BadValue(problem, key)


def check_distribution(key: str, dist: Any, rule: Rule) -> None:
    """A search distribution ``{low, high[, log][, step]}`` or ``{choices}`` for a key with ``rule``."""
    shape = "must be { low = ..., high = ... [, log = true | , step = ...] } or { choices = [...] }"
    if not isinstance(dist, dict):
        raise BadValue(shape)
    if "choices" in dist:
        _only(dist, ("choices",))
        choices = dist["choices"]
        if not isinstance(choices, list) or not choices:
            raise BadValue("choices must be a non-empty list")
        for choice in choices:
            problem = rule.problem(choice)
            if problem is not None:
                raise BadValue(f"choice {choice!r}: {problem}")
        if len({repr(c) for c in choices}) != len(choices):
            raise BadValue("choices list a value twice")
        return
    _only(dist, ("low", "high", "log", "step"))
    if rule.kind not in (int, float) or rule.optional:
        raise BadValue(f"{key} takes {{ choices = [...] }} only")
    if "low" not in dist or "high" not in dist:
        raise BadValue(shape)
    low, high = dist["low"], dist["high"]
    for end, value in (("low", low), ("high", high)):
        problem = rule.problem(value)
        if problem is not None:
            raise BadValue(f"{end} {problem}")
    if not low < high:
        raise BadValue(f"needs low < high, got low={low!r}, high={high!r}")
    log = dist.get("log", False)
    if not isinstance(log, bool):
        raise BadValue(f"log must be true or false, got {log!r}")
    if "step" in dist:
        step = dist["step"]
        if log:
            raise BadValue("log = true and step cannot be combined (Optuna samples either on a log scale or in steps)")
        if not _same_type(step, rule.kind) or not math.isfinite(step) or step <= 0:
            raise BadValue(f"step must be {'an integer ' if rule.kind is int else ''}> 0, got {step!r}")
    if log and low <= 0:
        raise BadValue(f"log = true needs low > 0, got low={low!r}")


def _only(table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            raise BadValue(f"unknown key {key!r}; allowed: {', '.join(allowed)}")
