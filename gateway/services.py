"""Writes for the gateway: set a client's policy and push it to every gateway process."""

from __future__ import annotations

import ipaddress
import json
import logging
import unicodedata
import uuid
from typing import TYPE_CHECKING, Any, cast

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.models import Field

from audit.chain import unicode_valid
from audit.redisconn import redis_sync
from audit.services import audit_record
from authserver.models import Client, RedeemedCode, RefreshToken
from gateway.models import ClientPolicy

if TYPE_CHECKING:
    from audit.anomaly import Finding

logger = logging.getLogger(__name__)

POLICY_CHANNEL = "portcullis:policy"
LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_tokens", "max_tokens", "user_rpm", "user_tpm")
POLICY_FIELDS = ("allowed_models", *LIMIT_FIELDS, "allow_ips", "quarantine_on_anomaly")
_local_listeners: list[Any] = []


def policy_listener_add(listener: Any) -> None:
    """Register an in-process listener for policy changes (the embedded default's push)."""
    _local_listeners.append(listener)


def policy_listener_remove(listener: Any) -> None:
    """Forget an in-process listener."""
    if listener in _local_listeners:
        _local_listeners.remove(listener)


CIDR_MAX_CHARS = 64  # as the admin API's schema says
MODEL_ID_CHARS = 200  # as the gateway's model_name takes it: the usage record's column
# Unicode control (Cc) and format (Cf) characters: the gateway refuses a model holding a control character,
# so such an id never matched, and the console's form split it at a line break; a format character
# (U+202E, a zero-width space) shows one id as another.
MODEL_ID_REFUSED_CATEGORIES = frozenset({"Cc", "Cf"})
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _limit_max(name: str) -> int:
    """The largest value the limit's column holds on every database Django supports."""
    field = cast("Field[Any, Any]", ClientPolicy._meta.get_field(name))  # a column, not a relation
    return BaseDatabaseOperations.integer_field_ranges[field.get_internal_type()][1]


def _validate(fields: dict[str, Any]) -> None:
    errors: dict[str, list[str]] = {}
    for cidr in fields.get("allow_ips") or []:
        if not isinstance(cidr, str) or len(cidr) > CIDR_MAX_CHARS:
            errors.setdefault("allow_ips", []).append(f"an IP network is at most {CIDR_MAX_CHARS} characters")
            continue
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.setdefault("allow_ips", []).append(f"{cidr!r} is not an IP network (CIDR)")
            continue
        if network.version == 6 and network.subnet_of(IPV4_MAPPED):
            # the gateway reads an IPv4-mapped client address as its IPv4 one, which this never matches
            errors.setdefault("allow_ips", []).append(f"{cidr!r} is IPv4-mapped: write the IPv4 network")
    if model_errors := _model_id_errors(fields.get("allowed_models") or []):
        errors["allowed_models"] = model_errors
    if not isinstance(fields.get("quarantine_on_anomaly", False), bool):
        errors["quarantine_on_anomaly"] = ["must be true or false"]
    for name in LIMIT_FIELDS:
        value, most = fields.get(name), _limit_max(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most
        ):
            errors[name] = [f"must be a whole number from 0 to {most}, or empty for no limit"]
    if errors:
        raise ValidationError(errors)


def _model_id_errors(models: list[Any]) -> list[str]:
    """Name what is wrong with the model ids: each must be 1 to 200 characters of valid Unicode text, with
    no control or format character (shown escaped, as the id's repr)."""
    errors: list[str] = []
    for model in models:
        if not isinstance(model, str) or not 0 < len(model) <= MODEL_ID_CHARS or not unicode_valid(model):
            message = f"model ids are non-empty UTF-8 strings of at most {MODEL_ID_CHARS} characters"
            if message not in errors:
                errors.append(message)
        elif any(unicodedata.category(c) in MODEL_ID_REFUSED_CATEGORIES for c in model):
            errors.append(f"{model!r}: a model id holds no control or format characters")
    return errors


def policy_set(*, client: Client | None, actor: str, **fields: Any) -> ClientPolicy:
    """Create or change a client's policy (``client=None``: the default policy) and push it."""
    unknown = set(fields) - set(POLICY_FIELDS)
    if unknown:
        raise ValidationError({"policy": [f"unknown fields: {', '.join(sorted(unknown))}"]})
    _validate(fields)
    with transaction.atomic():
        row = ClientPolicy.objects.select_for_update().filter(client=client).first() or ClientPolicy(
            client=client
        )
        before = {name: getattr(row, name) for name in POLICY_FIELDS} if row.pk else {}
        for name, value in fields.items():
            setattr(row, name, value)
        row.save()
        after = {name: getattr(row, name) for name in POLICY_FIELDS}
        client_id = client.client_id if client is not None else ""
        audit_record(
            kind="policy.changed",
            actor=actor,
            client_id=client_id,
            data={"changed": {k: v for k, v in after.items() if before.get(k) != v}},
        )
        transaction.on_commit(lambda: policy_publish(client_id or "*"))
    return row


def policy_publish(client_key: str) -> None:
    """Tell every gateway process that a policy changed (they reload it off the hot path)."""
    for listener in list(_local_listeners):
        listener(client_key)
    if not settings.REDIS_URL:
        return
    try:
        redis_sync(settings.REDIS_URL).publish(POLICY_CHANNEL, json.dumps({"client": client_key}))
    except redis.RedisError:
        logger.exception("policy push failed; gateways pick the change up on their next full reload")


def _offender_id(finding: Finding, client: Client) -> str:
    """The id of the one user of ``client`` a finding is attributable to; "" when it is about the client
    itself (its own client-credentials token, whose subject is the client) or cannot be pinned on one user.

    Usage findings carry the tokens' subject. A refresh-token reuse or a code replay names only the client
    (anyone holding a public client's rotated token or used code can present it), so the user is the one
    the token family was issued to."""
    if finding.user or not finding.evidence.get("token_family"):
        return finding.user
    try:
        family = uuid.UUID(str(finding.evidence["token_family"]))
    except ValueError:
        return ""
    tokens = RefreshToken.objects.filter(token_family=family, application=client)
    codes = RedeemedCode.objects.filter(token_family=family, client=client)
    owners = {*tokens.values_list("user_id", flat=True), *codes.values_list("user_id", flat=True)} - {None}
    return str(owners.pop()) if len(owners) == 1 else ""


def _user_get(user_id: str) -> Any | None:
    users = get_user_model()
    try:
        return users.objects.filter(pk=users._meta.pk.to_python(user_id)).first()
    except ValidationError:
        return None


def anomaly_quarantine(finding: Finding) -> None:
    """Quarantine what an anomaly is about when the client's policy asks for it: one user's access to the
    client (their tokens for it revoked and pushed) when the finding is theirs, so one user of a shared
    client cannot shut it for everyone; else the whole client (disabled, every token revoked and pushed)."""
    from authserver.services import client_disable, tokens_revoke_for_user

    if not finding.client_id:
        return
    row = ClientPolicy.objects.filter(client__client_id=finding.client_id).select_related("client").first()
    if row is None or not row.quarantine_on_anomaly or row.client is None or row.client.disabled:
        return
    actor = f"system:anomaly:{finding.rule}"
    user_id = _offender_id(finding, row.client)
    if not user_id:
        client_disable(client=row.client, actor=actor)
        return
    user = _user_get(user_id)
    if user is not None:  # else deleted since, and holding no token
        reason = f"anomaly quarantine: {finding.key}"
        tokens_revoke_for_user(user=user, client=row.client, actor=actor, reason=reason)
