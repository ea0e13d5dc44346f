"""The building blocks of request validation: checkers of one value (``Check``) and of an object's fields
against an allowlist, composed into the endpoints' tables in ``gateway.validation``.

A checker raises ``InvalidRequest`` naming the field's path, and returns ``DROP`` for a value it accepts
but that is not sent upstream, or a ``Replace`` for one it accepts in another form (an integral float where
an integer is expected goes upstream as the integer). A field sent as ``null`` is left out, unless its
checker keeps null as a value of its own (``nullable``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from gateway.errors import InvalidRequest

Check = Callable[[Any, str], Any]  # raises InvalidRequest; returns DROP, a Replace, or None (sent as is)


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


class Replace:
    """What a checker returns for a value it accepts in another form: the form sent upstream."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def integer(low: int, high: int) -> Check:
    """An integer from ``low`` to ``high``; an integral float (``256.0``) is taken as the integer and sent
    upstream as one, as vLLM's pydantic models read it (lax mode), and ``256.5`` is refused."""

    def check(value: Any, path: str) -> Replace | None:
        if type(value) is int:  # not a bool
            if not low <= value <= high:
                reject(path, f"must be between {low} and {high}")
            return None
        if type(value) is not float or not value.is_integer():
            reject(path, "must be an integer")
        if not low <= value <= high:
            reject(path, f"must be between {low} and {high}")
        return Replace(int(value))

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

    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

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


def any_object(value: Any, path: str) -> None:
    """Accept any JSON object (depth and size are bounded for the whole body)."""
    if type(value) is not dict:
        reject(path, "must be an object")


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
        if len(value) > max_items:
            reject(path, f"must have at most {max_items} items")
        if len(value) < min_items:
            reject(path, f"must have at least {min_items} item{'s' if min_items > 1 else ''}")
        for index, element in enumerate(value):
            replaced = item(element, f"{path}[{index}]")
            if type(replaced) is Replace:
                value[index] = replaced.value

    return check


JSON_TYPES: dict[type, str] = {
    str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "list"
}  # fmt: skip
# A list that is not empty, by the type of its first item: a list of several shapes is then checked item by
# item against the one its first item picked, and an error names the item that breaks it.
# A number first is read as an integer (``integer`` takes an integral float), so [1.0, 2] is token ids as
# [1, 2.0] is; no branch takes a list of other numbers.
JSON_LISTS: dict[type, str] = {kind: f"list of {name}s" for kind, name in JSON_TYPES.items()} | {
    float: "list of integers"
}


def json_type(value: Any) -> str:
    """A value's JSON type as ``one_of`` tells branches apart: ``string``, ``object``, ``list`` (an empty
    one), ``list of strings``, ``list of integers``, ``list of objects``, ``list of lists``..."""
    kind = type(value)
    if kind is list and value:
        return JSON_LISTS.get(type(value[0]), "list of nulls")
    return JSON_TYPES.get(kind, "null")


def one_of(branches: dict[str, Check], *, message: str) -> Check:
    """A value of one of several shapes, told apart by its JSON type (``json_type``): the branch of that
    type checks it, so an error names the real cause (a string too long, an unknown key in the third part),
    and ``message`` says what was expected only when no branch takes a value of that type."""

    def check(value: Any, path: str) -> Any:
        branch = branches.get(json_type(value))
        if branch is None:
            reject(path, message)
        return branch(value, path)

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
            continue
        result = checker(element, where)
        if result is None:
            continue
        if result is DROP:
            dropped.append(key)
        elif type(result) is Replace:
            value[key] = result.value  # an existing key: the dict's size, and so the iteration, is unchanged
    for key in dropped:
        del value[key]
    for key in required - value.keys():
        reject(f"{path}.{key}" if path else key, "is required")
