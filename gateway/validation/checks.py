"""The building blocks of request validation: checkers of one value (``Check``) and of an object's fields
against an allowlist, composed into the endpoints' tables in ``gateway.validation``.

A checker raises ``InvalidRequest`` naming the field's path, and returns ``DROP`` for a value it accepts
but that is not sent upstream. A field sent as ``null`` is left out, unless its checker keeps null as a
value of its own (``nullable``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from gateway.errors import InvalidRequest

Check = Callable[[Any, str], Any]  # raises InvalidRequest; returns DROP for a value not to send upstream


def reject(path: str, message: str) -> NoReturn:
    """Refuse the request: the field at ``path`` breaks a rule (``message`` says which)."""
    raise InvalidRequest(f"{message} ({path})", param=path)


def string(max_len: int = 256, choices: frozenset[str] | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            reject(path, "must be a string")
        if len(value) > max_len:
            reject(path, f"must be at most {max_len} characters")
        if choices is not None and value not in choices:
            reject(path, f"must be one of {', '.join(sorted(choices))}")

    return check


def integer(low: int, high: int) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            reject(path, "must be an integer")
        if not low <= value <= high:
            reject(path, f"must be between {low} and {high}")

    return check


def number(low: float, high: float) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            reject(path, "must be a number")
        if not low <= value <= high:  # exact for an int of any size (float() of one may overflow)
            reject(path, f"must be between {low} and {high}")

    return check


def boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        reject(path, "must be true or false")


KEEPS_NULL: set[Check] = set()  # checkers for which null is a value of its own (it goes upstream as sent)


def nullable(inner: Check) -> Check:
    """Null is a value of its own here (a message's content: an assistant turn that only calls tools)."""

    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)

    KEEPS_NULL.add(check)
    return check


class _Drop:
    """What a checker returns for a value that is accepted but not sent upstream."""


DROP = _Drop()


def absent(description: str) -> Check:
    """A field accepted only as null (then left out, like any null): a response field sent back."""

    def check(value: Any, path: str) -> None:
        reject(path, f"is accepted only as null ({description})")

    return check


def empty_list(description: str) -> Check:
    """A field accepted only as null or [] (then left out): a response field sent back."""

    def check(value: Any, path: str) -> Any:
        if value != []:
            reject(path, f"is accepted only as null or [] ({description})")
        return DROP

    return check


def any_json(value: Any, path: str) -> None:
    """Accept any JSON value (depth and size are bounded for the whole body)."""


def dropped(inner: Check) -> Check:
    """A field accepted (as ``inner`` checks it) but never sent upstream: one vLLM would ignore, sent by
    OpenAI SDKs (``store``, ``metadata``, a parsed reply's ``parsed``)."""

    def check(value: Any, path: str) -> Any:
        inner(value, path)
        return DROP

    return check


def list_of(item: Check, max_items: int, min_items: int = 0) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            reject(path, "must be a list")
        if not min_items <= len(value) <= max_items:
            reject(path, f"must have between {min_items} and {max_items} items")
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")

    return check


def one_of(*checks: Check, message: str) -> Check:
    def check(value: Any, path: str) -> Any:
        for candidate in checks:
            try:
                return candidate(value, path)
            except InvalidRequest:
                continue
        reject(path, message)

    return check


def obj(fields: dict[str, Check], required: frozenset[str] = frozenset()) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            reject(path, "must be an object")
        fields_check(value, fields, required, path)

    return check


def fields_check(
    value: dict[str, Any], fields: dict[str, Check], required: frozenset[str], path: str = ""
) -> None:
    """Check an object's keys against an allowlist and each value against its checker; leave out the
    fields sent as null (unless null is a value of their own) and those their checker drops."""
    dropped: list[str] = []
    for key, element in value.items():
        where = f"{path}.{key}" if path else key
        checker = fields.get(key)
        if checker is None:
            reject(where, "is not a supported field")
        if element is None and checker not in KEEPS_NULL:
            dropped.append(key)
        elif checker(element, where) is DROP:
            dropped.append(key)
    for key in dropped:
        del value[key]
    for key in required - value.keys():
        reject(f"{path}.{key}" if path else key, "is required")
