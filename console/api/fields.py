"""Strict serializer fields: a value of the wrong JSON type is an error, never silently converted; and a
strict serializer: a key it does not take is an error, never silently dropped.

DRF by default turns ``"5"`` into 5, ``"yes"`` into True and 5 into ``"5"``, and ignores unknown keys; the
admin API says what it takes in its schema and holds callers to it. Text that PostgreSQL cannot store (NUL,
lone surrogates) is refused as a 400 instead of failing as a 500 at the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rest_framework import serializers

from audit.chain import unicode_valid


def text_check(value: str) -> str:
    """Refuse text with NUL characters or lone surrogates (not storable, never meaningful here)."""
    if "\x00" in value:
        raise serializers.ValidationError("Null characters are not allowed.")
    if not unicode_valid(value):
        raise serializers.ValidationError("The text is not valid Unicode.")
    return value


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        # the length as sent, as the schema's maxLength reads it: DRF checks it after trimming whitespace,
        # so 3,000 characters that trim to 2,000 were taken where the schema says 2,000 at most
        if self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return str(super().to_internal_value(text_check(data)))


class StrictURLField(serializers.URLField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(text_check(data)))


class StrictChoiceField(serializers.ChoiceField):
    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid_choice", input=data)
        # before DRF's refusal, which repeats the input: a lone surrogate in it failed to render (a 500)
        return super().to_internal_value(text_check(data))


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


UNKNOWN_NAME_CHARS = 100  # an unknown key is named back in the error; a huge one is cut short


class StrictSerializer(serializers.Serializer):
    """A request body that holds only the fields this serializer writes: any other key is a 400 naming it.

    DRF drops unknown keys, so a misspelled ``RPM`` in a policy PUT read as "no limit", and a PATCH of
    ``disabled`` answered 200 having done nothing. A read-only field is refused too, unless ``echoed``: a
    body read with GET may then be sent back as it is, its read-only fields ignored. ``not_writable`` says
    where to do what a field would have.
    """

    not_writable: ClassVar[dict[str, str]] = {}
    echoed: ClassVar[bool] = False

    def to_internal_value(self, data: Any) -> Any:
        unknown = self._unknown_keys(data) if isinstance(data, Mapping) else {}
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if unknown and isinstance(exc.detail, dict):
                raise serializers.ValidationError({**exc.detail, **unknown}) from None
            raise
        if unknown:
            raise serializers.ValidationError(unknown)
        return value

    def _unknown_keys(self, data: Mapping[Any, Any]) -> dict[str, list[str]]:
        writable = [name for name, field in self.fields.items() if not field.read_only]
        unknown = "unknown field; this takes " + ", ".join(writable)
        errors: dict[str, list[str]] = {}
        for key in data:
            if key in writable or (self.echoed and key in self.fields):
                continue
            message = self.not_writable.get(key, unknown)
            errors.setdefault(_key_shown(key), []).append(message)
        return errors


def _key_shown(key: Any) -> str:
    """A key as the error names it: text the JSON answer can carry (a lone surrogate escaped), cut short."""
    text = str(key)
    if not unicode_valid(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= UNKNOWN_NAME_CHARS else text[:UNKNOWN_NAME_CHARS] + "…"
