"""The admin REST API under ``/api/admin/``: the same services and selectors as the console pages.

DRF is configured here, on the views, so the API does not depend on project-wide ``REST_FRAMEWORK``
settings: JSON only, admin-token or staff-session authentication, limit/offset paging, drf-spectacular.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.http import HttpResponse
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, renderers, routers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from audit.models import AuditReport
from audit.selectors import audit_events_filter, reports_list
from authserver.models import AccessToken, Client, SigningKey
from authserver.selectors import access_tokens_active, clients_search, users_search
from authserver.services import (
    access_token_revoke,
    client_create,
    client_disable,
    client_enable,
    client_secret_rotate,
    client_update,
    signing_key_revoke,
    signing_key_rotate,
    tokens_revoke_for_client,
    user_lock,
    user_unlock,
)
from console.api import serializers as s
from console.api.authentication import AdminBearerAuthentication, StaffSessionAuthentication
from console.api.permissions import AdminAccess, api_actor, api_denial_record
from gateway.models import ClientPolicy
from gateway.services import POLICY_FIELDS, policy_set

CLIENT_ID_REGEX = r"[!-.0-~]+"  # RFC 6749 §A.1: visible ASCII; minus "/" so it stays one path segment
REPORT_TYPES = {"html": "text/html", "csv": "text/csv", "json": "application/json"}


KID_REGEX = r"[A-Za-z0-9_-]{1,128}"  # a key id: an RFC 7638 thumbprint, base64url (no NUL reaches a query)


class NestingSafeJSONParser(JSONParser):
    """DRF's JSON parser, with JSON nested past Python's recursion limit a 400 like any unreadable body:
    DRF catches only ``ValueError``, and a body of 100,000 brackets was a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None


class AdminPagination(LimitOffsetPagination):
    """limit/offset paging that refuses a bad number (DRF's default quietly ignores it)."""

    default_limit = 50
    max_limit = 500

    def get_limit(self, request: Any) -> int:
        return min(
            self._number(request, self.limit_query_param, self.default_limit, minimum=1), self.max_limit
        )

    def get_offset(self, request: Any) -> int:
        return self._number(request, self.offset_query_param, 0, minimum=0)

    @staticmethod
    def _number(request: Any, name: str, default: int, *, minimum: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        # The length first: int() refuses a string of more than 4,300 digits with a ValueError (a 500).
        if len(raw) > 12 or not raw.isascii() or not raw.isdigit() or int(raw) < minimum:
            raise ValidationError({name: [f"must be a whole number, at least {minimum}"]})
        return int(raw)


class AdminAPIMixin:
    """DRF configuration shared by every admin API view."""

    authentication_classes = [AdminBearerAuthentication, StaffSessionAuthentication]
    permission_classes = [AdminAccess]
    renderer_classes = [renderers.JSONRenderer]
    parser_classes = [NestingSafeJSONParser]
    pagination_class = AdminPagination
    schema = AutoSchema()

    def finalize_response(self, request: Any, response: Any, *args: Any, **kwargs: Any) -> Any:
        """Every answer is ``no-store``: a new client's secret, users, tokens and audit events must not stay
        in a browser's or a proxy's cache (the API also serves staff sessions)."""
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def options(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        """``OPTIONS`` answers with the ``Allow`` header alone, as Django's own views do: the OpenAPI schema
        describes the fields. DRF's metadata called ``get_object()`` to describe a ``PUT`` on a list route
        (``policies/default/``), a 500 for every caller allowed to write."""
        return Response(status=status.HTTP_200_OK)

    def handle_exception(self, exc: Exception) -> Response:
        """Answer as DRF does; a refused credential or permission is also an audit event."""
        response: Response = super().handle_exception(exc)  # type: ignore[misc]  # a mixin of APIView
        if isinstance(exc, exceptions.AuthenticationFailed | exceptions.PermissionDenied):
            api_denial_record(self.request, exc)  # type: ignore[attr-defined]
        return response


def documented(**kwargs: Any) -> Any:
    """``extend_schema`` on top of drf-spectacular's AutoSchema even without a project-wide
    ``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]`` (extend_schema would otherwise extend DRF's own)."""

    def decorate(method: Any) -> Any:
        if not getattr(method, "kwargs", {}).get("schema"):
            method.schema = AutoSchema
        decorated = extend_schema(**kwargs)(method)
        method.__dict__.pop("schema", None)
        return decorated

    return decorate


def _service_call(func: Any, **kwargs: Any) -> Any:
    """Call a service, turning its Django validation errors into a 400 with the same messages."""
    try:
        return func(**kwargs)
    except DjangoValidationError as exc:
        raise ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        ) from None


class ClientViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """OAuth clients: create, change, disable, enable, rotate the secret, revoke tokens, set the policy."""

    serializer_class = s.ClientSerializer
    lookup_field = "client_id"
    lookup_value_regex = CLIENT_ID_REGEX

    def get_queryset(self) -> QuerySet[Client]:
        return clients_search(query=_valid(s.SearchSerializer, self.request.query_params).get("q", ""))

    @documented(
        summary="List clients",
        parameters=[OpenApiParameter("q", str, description="Search name, client id and description")],
    )
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.ClientSerializer(page, many=True).data)

    @documented(summary="Show a client")
    def retrieve(self, request: Request, client_id: str) -> Response:
        return Response(s.ClientSerializer(self.get_object()).data)

    @documented(
        summary="Create a client", request=s.ClientWriteSerializer, responses={201: s.ClientCreatedSerializer}
    )
    def create(self, request: Request) -> Response:
        data = _valid(s.ClientWriteSerializer, request.data)
        registered = _service_call(client_create, actor=api_actor(request), **data)
        body = dict(s.ClientSerializer(registered.client).data, client_secret=registered.client_secret)
        return Response(body, status=status.HTTP_201_CREATED)

    @documented(
        summary="Change a client", request=s.ClientWriteSerializer, responses={200: s.ClientSerializer}
    )
    def partial_update(self, request: Request, client_id: str) -> Response:
        client = self.get_object()
        data = _valid(s.ClientWriteSerializer, request.data, partial=True)
        if "public" in data:
            raise ValidationError({"public": ["a client's type cannot change; create a new client"]})
        for listed in ("redirect_uris", "post_logout_redirect_uris", "allowed_origins"):
            if listed in data:
                data[listed] = " ".join(data[listed])
        if "scopes" in data:
            data["allowed_scopes"] = " ".join(data.pop("scopes"))
        _service_call(client_update, client=client, actor=api_actor(request), **data)
        return Response(s.ClientSerializer(client).data)

    @documented(summary="Disable a client and revoke its tokens", request=None, responses=s.ClientSerializer)
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, client_id: str) -> Response:
        client = self.get_object()
        client_disable(client=client, actor=api_actor(request))
        return Response(s.ClientSerializer(client).data)

    @documented(summary="Enable a disabled client", request=None, responses=s.ClientSerializer)
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, client_id: str) -> Response:
        client = self.get_object()
        client_enable(client=client, actor=api_actor(request))
        return Response(s.ClientSerializer(client).data)

    @documented(
        summary="Rotate a client's secret (shown once)", request=None, responses=s.ClientSecretSerializer
    )
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, client_id: str) -> Response:
        client = self.get_object()
        secret = _service_call(client_secret_rotate, client=client, actor=api_actor(request))
        response = Response({"client_id": client.client_id, "client_secret": secret})
        response["Cache-Control"] = "no-store"
        return response

    @documented(summary="Revoke every token of a client", request=None, responses=s.RevokedSerializer)
    @action(detail=True, methods=["post"], url_path="revoke-tokens")
    def revoke_tokens(self, request: Request, client_id: str) -> Response:
        client = self.get_object()
        count = tokens_revoke_for_client(
            client=client, actor=api_actor(request), reason="revoked by an admin"
        )
        return Response({"tokens_revoked": count})

    @documented(methods=["GET"], summary="Show a client's policy", responses=s.PolicySerializer)
    @documented(
        methods=["PUT"],
        summary="Set a client's policy",
        request=s.PolicySerializer,
        responses=s.PolicySerializer,
    )
    @action(detail=True, methods=["get", "put"])
    def policy(self, request: Request, client_id: str) -> Response:
        return _policy(request, self.get_object())


def _valid(serializer_class: Any, data: Any, *, partial: bool = False) -> dict[str, Any]:
    serializer = serializer_class(data=data, partial=partial)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _policy(request: Request, client: Client | None) -> Response:
    row = ClientPolicy.objects.filter(client=client).first()
    if request.method == "PUT":
        data = _valid(s.PolicySerializer, request.data)
        # PUT replaces the whole policy: a field left out means its empty value (no models, no limit).
        empty: dict[str, Any] = {"allowed_models": [], "allow_ips": [], "quarantine_on_anomaly": False}
        fields = {name: data.get(name, empty.get(name)) for name in POLICY_FIELDS}
        row = _service_call(policy_set, client=client, actor=api_actor(request), **fields)
    if row is None:
        return Response({"detail": "No policy is set."}, status=status.HTTP_404_NOT_FOUND)
    return Response(s.PolicySerializer(row).data)


class PolicyViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """Gateway policies; a client's own is also at ``clients/{client_id}/policy/``."""

    serializer_class = s.PolicySerializer
    queryset = ClientPolicy.objects.select_related("client").order_by("id")

    @documented(summary="List every policy (the default one has client_id null)")
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.PolicySerializer(page, many=True).data)

    @documented(methods=["GET"], summary="Show the default policy", responses=s.PolicySerializer)
    @documented(
        methods=["PUT"],
        summary="Set the default policy",
        request=s.PolicySerializer,
        responses=s.PolicySerializer,
    )
    @action(detail=False, methods=["get", "put"])
    def default(self, request: Request) -> Response:
        return _policy(request, None)


class TokenViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """Live access tokens; DELETE revokes one at once on every gateway."""

    serializer_class = s.TokenSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[AccessToken]:
        params = _valid(s.TokenFilterSerializer, self.request.query_params)
        client = user = None
        if params.get("client_id"):
            client = Client.objects.filter(client_id=params["client_id"]).first()
            if client is None:
                return AccessToken.objects.none()
        if params.get("user"):
            user = get_user_model().objects.filter(username=params["user"]).first()
            if user is None:
                return AccessToken.objects.none()
        return access_tokens_active(client=client, user=user)

    @documented(
        summary="List live access tokens",
        parameters=[
            OpenApiParameter("client_id", str, description="Only this client's tokens"),
            OpenApiParameter("user", str, description="Only this user's tokens (user name)"),
        ],
    )
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.TokenSerializer(page, many=True).data)

    @documented(summary="Revoke one access token")
    def destroy(self, request: Request, pk: str) -> Response:
        token = self.get_object()
        access_token_revoke(token=token, actor=api_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class UserViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """User accounts: lock (no sign-in, tokens revoked) and unlock."""

    serializer_class = s.UserSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Any]:
        return users_search(query=_valid(s.SearchSerializer, self.request.query_params).get("q", ""))

    @documented(
        summary="List users",
        parameters=[OpenApiParameter("q", str, description="Search user name and e-mail")],
    )
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.UserSerializer(page, many=True).data)

    @documented(summary="Show a user")
    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(s.UserSerializer(self.get_object()).data)

    @documented(summary="Lock a user and revoke their tokens", request=None, responses=s.UserSerializer)
    @action(detail=True, methods=["post"])
    def lock(self, request: Request, pk: str) -> Response:
        user = self.get_object()
        _service_call(user_lock, user=user, actor=api_actor(request))
        return Response(s.UserSerializer(user).data)

    @documented(summary="Unlock a user", request=None, responses=s.UserSerializer)
    @action(detail=True, methods=["post"])
    def unlock(self, request: Request, pk: str) -> Response:
        user = self.get_object()
        user_unlock(user=user, actor=api_actor(request))
        return Response(s.UserSerializer(user).data)


class AuditEventViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """The audit log, filtered by time, actor, client, kind (prefix) and outcome."""

    serializer_class = s.AuditEventSerializer

    @documented(summary="List audit events, newest first", parameters=[s.AuditFilterSerializer])
    def list(self, request: Request) -> Response:
        filters = {k: v for k, v in _valid(s.AuditFilterSerializer, request.query_params).items() if v != ""}
        page = self.paginate_queryset(audit_events_filter(**filters))
        return self.get_paginated_response(s.AuditEventSerializer(page, many=True).data)


class PassthroughRenderer(renderers.BaseRenderer):
    """Lets a download answer in its own media type (and errors still as JSON)."""

    media_type = "*/*"
    format = ""

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        if isinstance(data, bytes):
            return data
        response = (renderer_context or {}).get("response")
        if response is not None:  # an error: labelled as the JSON it is, not "*/*"
            response["Content-Type"] = "application/json"
        return json.dumps(data).encode()


class ReportViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """Stored audit reports; ``download/`` returns one as a file."""

    serializer_class = s.ReportSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[AuditReport]:
        return reports_list()

    @documented(summary="List stored audit reports")
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.ReportSerializer(page, many=True).data)

    @documented(
        summary="Download a report",
        responses={
            (200, "text/html"): OpenApiResponse(OpenApiTypes.STR),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR),
            (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT),
        },
    )
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, PassthroughRenderer])
    def download(self, request: Request, pk: str) -> HttpResponse:
        report = self.get_object()
        response = HttpResponse(report.content, content_type=REPORT_TYPES.get(report.format, "text/plain"))
        response["Content-Disposition"] = f'attachment; filename="{report.filename()}"'
        return response


class KeyViewSet(AdminAPIMixin, viewsets.GenericViewSet):
    """Signing keys (public identity and dates only); ``rotate/`` rotates now."""

    serializer_class = s.SigningKeySerializer
    queryset = SigningKey.objects.defer("private_key_encrypted").order_by("-created_at")
    lookup_field = "kid"
    lookup_value_regex = KID_REGEX

    @documented(summary="List signing keys with their lifecycle")
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.SigningKeySerializer(page, many=True).data)

    @documented(
        summary="Rotate the signing key now", request=s.KeyRotateSerializer, responses=s.KeyRotationSerializer
    )
    @action(detail=False, methods=["post"])
    def rotate(self, request: Request) -> Response:
        data = _valid(s.KeyRotateSerializer, request.data)
        result = signing_key_rotate(force=True, activate_now=data["activate_now"], actor=api_actor(request))
        return Response(result.as_dict())

    @documented(
        summary="Revoke a leaked signing key: unpublished at once (replaced first if it signs)",
        request=None,
        responses=s.KeyRotationSerializer,
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, kid: str) -> Response:
        result = _service_call(signing_key_revoke, kid=kid, actor=api_actor(request))
        return Response(result.as_dict())


@extend_schema(exclude=True)  # an index, not an operation: the schema it links to describes the API
class AdminAPIRootView(AdminAPIMixin, routers.APIRootView):
    """``/api/admin/``: a link to the OpenAPI schema and to each resource (after authentication, as every
    admin API answer)."""

    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        resources = super().get(request, *args, **kwargs).data
        return Response({"schema": reverse("console:api-schema", request=request), **resources})


@extend_schema(exclude=True)  # not an operation: every unknown path answers this
class NotFoundView(AdminAPIMixin, APIView):
    """Any other path under /api/admin/: a JSON 404 (after authentication, so it reveals nothing)."""

    def _not_found(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)

    get = post = put = patch = delete = _not_found
