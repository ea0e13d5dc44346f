"""Admin API representations: what goes in and out. Validation of meaning stays in the services."""

from __future__ import annotations

from typing import Any, ClassVar

from rest_framework import serializers

from audit.models import AuditEvent, AuditReport
from authserver.models import AccessToken, Client, SigningKey, origin_errors, redirect_uri_errors
from console.api.fields import (
    StrictBooleanField,
    StrictCharField,
    StrictChoiceField,
    StrictIntegerField,
    StrictSerializer,
    StrictURLField,
)
from console.forms import (
    DAILY_TOKENS_MAX,
    GRANT_ALIAS_OF,
    GRANT_CHOICES,
    LIMIT_MAX,
    scope_choices,
)
from gateway.models import ClientPolicy
from gateway.services import POLICY_FIELDS

GRANT_ALIASES = [alias for alias, _ in GRANT_CHOICES]


class ClientSerializer(serializers.ModelSerializer):
    """A client as the API shows it (never its secret)."""

    public = serializers.SerializerMethodField()
    logo_url = serializers.CharField(read_only=True, help_text="A URL, or empty")
    grant_types = serializers.SerializerMethodField()
    redirect_uris = serializers.SerializerMethodField()
    allowed_origins = serializers.SerializerMethodField()
    post_logout_redirect_uris = serializers.SerializerMethodField()
    scopes = serializers.SerializerMethodField()

    class Meta:
        model = Client
        fields = [
            "client_id",
            "name",
            "description",
            "logo_url",
            "public",
            "grant_types",
            "redirect_uris",
            "allowed_origins",
            "post_logout_redirect_uris",
            "scopes",
            "can_introspect",
            "is_admin_client",
            "disabled",
            "created",
            "updated",
        ]
        read_only_fields = fields

    def get_public(self, client: Client) -> bool:
        return bool(client.client_type == Client.CLIENT_PUBLIC)

    def get_grant_types(self, client: Client) -> list[str]:
        return [GRANT_ALIAS_OF.get(g, g) for g in client.grant_types]

    def get_redirect_uris(self, client: Client) -> list[str]:
        return list(client.redirect_uris.split())

    def get_allowed_origins(self, client: Client) -> list[str]:
        return list(client.allowed_origins.split())

    def get_post_logout_redirect_uris(self, client: Client) -> list[str]:
        return list(client.post_logout_redirect_uris.split())

    def get_scopes(self, client: Client) -> list[str]:
        return client.scope_list()


class ClientWriteSerializer(StrictSerializer):
    """Fields to create a client (all of them) or change one (any of them; ``public`` is fixed)."""

    not_writable: ClassVar[dict[str, str]] = {
        "disabled": "not written here: POST /api/admin/clients/{client_id}/disable/ disables a client and "
        "revokes its tokens, enable/ enables it again",
        "client_secret": "not written here: POST /api/admin/clients/{client_id}/rotate-secret/ gives a "
        "confidential client a new secret (shown once)",
        "client_id": "set by the server when the client is created; it never changes",
    }

    name = StrictCharField(max_length=255)
    description = StrictCharField(required=False, allow_blank=True, default="", max_length=2000)
    logo_url = StrictURLField(required=False, allow_blank=True, default="", max_length=200)
    public = StrictBooleanField(required=False, default=False)
    grant_types = serializers.ListField(
        child=StrictChoiceField(choices=GRANT_ALIASES), min_length=1, max_length=3
    )
    redirect_uris = serializers.ListField(  # untrimmed: whitespace anywhere in one is refused, not cut off
        child=StrictCharField(max_length=2000, trim_whitespace=False),
        required=False,
        default=list,
        max_length=50,
    )
    post_logout_redirect_uris = serializers.ListField(
        child=StrictCharField(max_length=2000, trim_whitespace=False),
        required=False,
        default=list,
        max_length=50,
        help_text="Where OpenID Connect RP-initiated logout may send the user back (each matched exactly)",
    )
    allowed_origins = serializers.ListField(
        child=StrictCharField(max_length=300, trim_whitespace=False),
        required=False,
        default=list,
        max_length=50,
        help_text="Web origins (https://host[:port]; http only for a loopback IP) whose pages may call the "
        "token endpoint and /v1 (CORS)",
    )
    scopes = serializers.ListField(
        child=StrictChoiceField(choices=[s for s, _ in scope_choices()]), min_length=1, max_length=20
    )
    can_introspect = StrictBooleanField(required=False, default=False)
    is_admin_client = StrictBooleanField(required=False, default=False)

    def validate_redirect_uris(self, uris: list[str]) -> list[str]:
        errors = redirect_uri_errors(uris)
        if errors:
            raise serializers.ValidationError(errors)
        return uris

    def validate_post_logout_redirect_uris(self, uris: list[str]) -> list[str]:
        return self.validate_redirect_uris(uris)

    def validate_allowed_origins(self, origins: list[str]) -> list[str]:
        errors = origin_errors(origins)
        if errors:
            raise serializers.ValidationError(errors)
        return origins


class ClientCreatedSerializer(ClientSerializer):
    """A new client with its secret: the only answer that ever contains it."""

    client_secret = serializers.CharField(allow_null=True, read_only=True)

    class Meta(ClientSerializer.Meta):
        fields = [*ClientSerializer.Meta.fields, "client_secret"]
        read_only_fields = fields


class ClientSecretSerializer(serializers.Serializer):
    """A rotated secret, shown once."""

    client_id = serializers.CharField(read_only=True)
    client_secret = serializers.CharField(read_only=True)


class RevokedSerializer(serializers.Serializer):
    """How many access tokens were revoked."""

    tokens_revoked = serializers.IntegerField(read_only=True)


def _limit(maximum: int = LIMIT_MAX) -> StrictIntegerField:
    return StrictIntegerField(min_value=0, max_value=maximum, required=False, allow_null=True)


class PolicySerializer(StrictSerializer, serializers.ModelSerializer):
    """A gateway policy; null numbers mean no limit, an empty model list means no model."""

    echoed = True  # a policy read with GET may be PUT back as it is: its client_id and updated_at are ignored

    client_id = serializers.SerializerMethodField()
    allowed_models = serializers.ListField(
        child=StrictCharField(max_length=200), required=False, max_length=1000
    )
    rpm = _limit()
    tpm = _limit()
    concurrency = _limit()
    daily_tokens = _limit(DAILY_TOKENS_MAX)
    max_tokens = _limit()
    user_rpm = _limit()
    user_tpm = _limit()
    allow_ips = serializers.ListField(child=StrictCharField(max_length=64), required=False, max_length=1000)
    quarantine_on_anomaly = StrictBooleanField(required=False, default=False)

    class Meta:
        model = ClientPolicy
        fields = ["client_id", *POLICY_FIELDS, "updated_at"]
        read_only_fields = ["client_id", "updated_at"]

    def get_client_id(self, policy: ClientPolicy) -> str | None:
        return policy.client.client_id if policy.client is not None else None


class TokenSerializer(serializers.ModelSerializer):
    """A live access token (its id and metadata; the token itself is never stored)."""

    client_id = serializers.SerializerMethodField()
    client_name = serializers.SerializerMethodField()
    user = serializers.SerializerMethodField()

    class Meta:
        model = AccessToken
        fields = ["id", "jti", "client_id", "client_name", "user", "scope", "created", "expires"]
        read_only_fields = fields

    def get_client_id(self, token: AccessToken) -> str | None:
        return token.application.client_id if token.application else None

    def get_client_name(self, token: AccessToken) -> str | None:
        return token.application.name if token.application else None

    def get_user(self, token: AccessToken) -> str | None:
        return token.user.get_username() if token.user else None


class UserSerializer(serializers.Serializer):
    """A user account as admins see it."""

    id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(read_only=True)
    email = serializers.EmailField(read_only=True)
    is_active = serializers.BooleanField(read_only=True)
    is_staff = serializers.BooleanField(read_only=True)
    is_superuser = serializers.BooleanField(read_only=True)
    last_login = serializers.DateTimeField(read_only=True, allow_null=True)
    date_joined = serializers.DateTimeField(read_only=True)
    consent_count = serializers.IntegerField(read_only=True, required=False)
    token_count = serializers.IntegerField(read_only=True, required=False)


class AuditEventSerializer(serializers.ModelSerializer):
    """One audit record, with its place in the hash chain."""

    data = serializers.JSONField(read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "occurred_at",
            "kind",
            "outcome",
            "actor",
            "client_id",
            "ip",
            "request_id",
            "data",
            "seq",
            "prev_hash",
            "hash",
        ]
        read_only_fields = fields


class QueryDateTimeField(serializers.DateTimeField):
    """A date-time query parameter: an empty one is an error (DRF would quietly drop it)."""

    def get_value(self, dictionary: Any) -> Any:
        if dictionary.get(self.field_name) == "":
            return ""
        return super().get_value(dictionary)


class AuditFilterSerializer(serializers.Serializer):
    """Query parameters of the audit event list (an empty text filter means no filter)."""

    since = QueryDateTimeField(required=False)
    until = QueryDateTimeField(required=False)
    actor = StrictCharField(required=False, max_length=200, allow_blank=True)
    client_id = StrictCharField(required=False, max_length=100, allow_blank=True)
    kind = StrictCharField(required=False, max_length=64, allow_blank=True)
    outcome = StrictChoiceField(required=False, choices=AuditEvent.Outcome.choices, allow_blank=True)


class SearchSerializer(serializers.Serializer):
    """Query parameters of the searchable lists."""

    q = StrictCharField(required=False, max_length=150, allow_blank=True)


class TokenFilterSerializer(serializers.Serializer):
    """Query parameters of the token list."""

    client_id = StrictCharField(required=False, max_length=100, allow_blank=True)
    user = StrictCharField(required=False, max_length=150, allow_blank=True)


class ReportSerializer(serializers.ModelSerializer):
    """A stored audit report (download its content from ``download/``)."""

    filename = serializers.CharField(read_only=True)

    class Meta:
        model = AuditReport
        fields = [
            "id",
            "kind",
            "format",
            "since",
            "until",
            "chain_head",
            "chain_seq",
            "created_at",
            "created_by",
            "filename",
        ]
        read_only_fields = fields


class SigningKeySerializer(serializers.ModelSerializer):
    """A signing key's public identity and lifecycle (never its private part)."""

    class Meta:
        model = SigningKey
        fields = [
            "kid",
            "algorithm",
            "state",
            "created_at",
            "publish_at",
            "activate_after",
            "activated_at",
            "retired_at",
            "remove_after",
            "removed_at",
        ]
        read_only_fields = fields


class KeyRotateSerializer(StrictSerializer):
    """Rotate now; ``activate_now`` makes the new key sign at once (for a compromised key)."""

    activate_now = StrictBooleanField(required=False, default=False)


class KeyRotationSerializer(serializers.Serializer):
    """What a rotation did, as key ids: one key family per signing algorithm in use rotates."""

    created = serializers.ListField(child=serializers.CharField(), read_only=True)
    activated = serializers.ListField(child=serializers.CharField(), read_only=True)
    retired = serializers.ListField(
        child=serializers.CharField(), read_only=True, help_text="keys of an algorithm no longer in use"
    )
    removed = serializers.ListField(child=serializers.CharField(), read_only=True)
