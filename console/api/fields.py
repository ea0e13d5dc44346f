"""Strict serializer fields: a value of the wrong JSON type is an error, never silently converted.

DRF by default turns ``"5"`` into 5, ``"yes"`` into True and 5 into ``"5"``; the admin API says what it
takes in its schema and holds callers to it. Text that PostgreSQL cannot store (NUL, lone surrogates)
is refused as a 400 instead of failing as a 500 at the database.
"""

from __future__ import annotations

from typing import Any

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
