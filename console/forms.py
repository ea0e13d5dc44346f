"""Console forms: they parse and present input; the services decide what is valid and do the work."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from audit.models import AuditEvent
from authserver.models import origin_errors, redirect_uri_errors
from authserver.services import ADMIN_SCOPES, GRANT_ALIASES
from gateway.models import ClientPolicy
from gateway.services import POLICY_FIELDS

GRANT_CHOICES = [
    ("authorization-code", "Authorization code + PKCE (web and native apps)"),
    ("client-credentials", "Client credentials (services)"),
    ("device-code", "Device authorization (CLIs, headless boxes)"),
]
GRANT_ALIAS_OF = {value: alias for alias, value in GRANT_ALIASES.items()}
# The largest limit each policy column stores (PostgreSQL integer and bigint): a larger number is a form
# error, not a database error (a 500).
LIMIT_MAX = 2_147_483_647
DAILY_TOKENS_MAX = 2**63 - 1


def scope_choices() -> list[tuple[str, str]]:
    """Return every scope a client may be given, with its plain-words description."""
    described = dict(settings.SCOPES)
    described.setdefault("admin.read", "Read the admin API (administrative clients only)")
    described.setdefault("admin.write", "Change things through the admin API (administrative clients only)")
    return [(scope, f"{scope}: {text}") for scope, text in described.items()]


def split_lines(text: str) -> list[str]:
    """Split a textarea or comma list into its non-empty entries."""
    return [part for part in text.replace(",", " ").split() if part]


def lines_of(text: str) -> list[str]:
    """Split a textarea into its lines, each stripped, empty ones dropped.

    Only a line break separates entries (a browser posts CRLF; strip takes the CR): a model id may hold
    spaces and commas, as the API and the gateway allow.
    """
    return [line.strip() for line in text.split("\n") if line.strip()]


def errors_to_form(form: forms.Form, exc: ValidationError) -> None:
    """Show a service's validation errors on the form fields they name (else on the form)."""
    aliases = {"allowed_scopes": "scopes", "client_secret": None}
    for field, messages in exc.message_dict.items():
        name = aliases.get(field, field)
        for message in messages:
            form.add_error(name if name in form.fields else None, message)


class ClientForm(forms.Form):
    """Create or edit a client."""

    name = forms.CharField(max_length=255)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    logo_url = forms.URLField(required=False, label="Logo URL", assume_scheme="https")
    public = forms.BooleanField(
        required=False, label="Public client (no secret: native and single-page apps)"
    )
    grant_types = forms.MultipleChoiceField(choices=GRANT_CHOICES, widget=forms.CheckboxSelectMultiple)
    redirect_uris = forms.CharField(
        required=False,
        label="Redirect URIs",
        help_text="One per line; https, or http only for a loopback IP (RFC 8252).",
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    post_logout_redirect_uris = forms.CharField(
        required=False,
        label="Post-logout redirect URIs",
        help_text="One per line: where OpenID Connect logout may send the user back; https, or http only for "
        "a loopback IP.",
        widget=forms.Textarea(attrs={"rows": 2}),
    )
    allowed_origins = forms.CharField(
        required=False,
        label="Allowed web origins",
        help_text="One per line, as https://host or https://host:port (http only for a loopback IP, "
        "http://127.0.0.1:5173): pages there may call the token endpoint and /v1 from a browser (CORS). "
        "Empty: no web page may.",
        widget=forms.Textarea(attrs={"rows": 2}),
    )
    scopes = forms.MultipleChoiceField(choices=scope_choices, widget=forms.CheckboxSelectMultiple)
    can_introspect = forms.BooleanField(required=False, label="May introspect tokens (RFC 7662)")
    is_admin_client = forms.BooleanField(
        required=False, label="Administrative client (may be given admin.read / admin.write)"
    )

    def __init__(self, *args: Any, editing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if editing:
            del self.fields["public"]

    def _lines_checked(self, field: str, errors_of: Callable[[list[str]], list[str]]) -> str:
        """A field of one item per line, refused with what ``errors_of`` says of its items."""
        text = str(self.cleaned_data[field])
        errors = errors_of(split_lines(text))
        if errors:
            raise ValidationError(errors)
        return text

    def clean_redirect_uris(self) -> str:
        return self._lines_checked("redirect_uris", redirect_uri_errors)

    def clean_post_logout_redirect_uris(self) -> str:
        return self._lines_checked("post_logout_redirect_uris", redirect_uri_errors)

    def clean_allowed_origins(self) -> str:
        return self._lines_checked("allowed_origins", origin_errors)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if ADMIN_SCOPES.intersection(data.get("scopes") or []) and not data.get("is_admin_client"):
            self.add_error("scopes", "Admin scopes are only for clients marked administrative.")
        return data

    def service_fields(self) -> dict[str, Any]:
        """Return the cleaned data named as the client services expect it."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "description": data["description"],
            "logo_url": data["logo_url"],
            "grant_types": list(data["grant_types"]),
            "redirect_uris": split_lines(data["redirect_uris"]),
            "post_logout_redirect_uris": split_lines(data["post_logout_redirect_uris"]),
            "allowed_origins": split_lines(data["allowed_origins"]),
            "scopes": list(data["scopes"]),
            "can_introspect": data["can_introspect"],
            "is_admin_client": data["is_admin_client"],
        }


class PolicyForm(forms.Form):
    """A client's gateway policy; empty numbers mean no limit."""

    allowed_models = forms.CharField(
        required=False,
        label="Models",
        help_text="Model ids, one per line. Empty: no model at all.",
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    rpm = forms.IntegerField(required=False, min_value=0, max_value=LIMIT_MAX, label="Requests per minute")
    tpm = forms.IntegerField(required=False, min_value=0, max_value=LIMIT_MAX, label="LLM tokens per minute")
    concurrency = forms.IntegerField(
        required=False, min_value=0, max_value=LIMIT_MAX, label="Concurrent requests"
    )
    daily_tokens = forms.IntegerField(
        required=False, min_value=0, max_value=DAILY_TOKENS_MAX, label="Tokens per UTC day"
    )
    max_tokens = forms.IntegerField(
        required=False, min_value=0, max_value=LIMIT_MAX, label="Largest max_tokens per request"
    )
    user_rpm = forms.IntegerField(
        required=False, min_value=0, max_value=LIMIT_MAX, label="Requests per minute per user"
    )
    user_tpm = forms.IntegerField(
        required=False, min_value=0, max_value=LIMIT_MAX, label="Tokens per minute per user"
    )
    allow_ips = forms.CharField(
        required=False,
        label="IP allowlist",
        help_text="CIDRs, one per line. Empty: any address.",
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    quarantine_on_anomaly = forms.BooleanField(
        required=False,
        label="On an anomaly: revoke the tokens of the one user it is about, else disable the client",
    )

    @staticmethod
    def initial_for(policy: ClientPolicy | None) -> dict[str, Any]:
        """Return a stored policy as the form shows it, so that posting it back unchanged keeps it."""
        if policy is None:
            return {}
        initial = {name: getattr(policy, name) for name in POLICY_FIELDS}
        initial["allowed_models"] = "\n".join(policy.allowed_models)
        initial["allow_ips"] = "\n".join(policy.allow_ips)
        return initial

    def policy_fields(self) -> dict[str, Any]:
        """Return the cleaned data as ``gateway.services.policy_set`` takes it."""
        data = dict(self.cleaned_data)
        data["allowed_models"] = lines_of(data["allowed_models"])
        data["allow_ips"] = split_lines(data["allow_ips"])
        return data


class AuditFilterForm(forms.Form):
    """Filters for the audit list and its CSV export."""

    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M")
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M")
    )
    actor = forms.CharField(required=False, max_length=200)
    client_id = forms.CharField(required=False, max_length=100, label="Client id")
    kind = forms.CharField(
        required=False,
        max_length=64,
        help_text="A kind or its prefix, e.g. token.",
        widget=forms.TextInput(attrs={"list": "kinds"}),
    )
    outcome = forms.ChoiceField(required=False, choices=[("", "any"), *AuditEvent.Outcome.choices])

    def clean_since(self) -> datetime | None:
        return self._in_range("since")

    def clean_until(self) -> datetime | None:
        return self._in_range("until")

    def _in_range(self, name: str) -> datetime | None:
        """A time the database can be asked about: 0001-01-01T00:00+05:00 parses, but is before year 1 in
        UTC, and converting it for the query raised OverflowError (a 500) on SQLite."""
        value: datetime | None = self.cleaned_data.get(name)
        if value is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValidationError("This time is out of range.") from None
        return value

    def filters(self) -> dict[str, Any]:
        """Return the valid filters (all empty when the form is invalid)."""
        if not self.is_valid():
            return {}
        return {name: value for name, value in self.cleaned_data.items() if value not in (None, "")}
