"""The request context (true client IP, request id) and the audit service's refusal to store credentials."""

from __future__ import annotations

import pytest

from audit.context import client_ip_resolve, request_id_from, trusted_networks
from audit.models import AuditEvent
from audit.services import audit_record

PROXIES = trusted_networks(("10.0.0.0/8", "192.168.1.1/32"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),  # untrusted peer: XFF is ignored
        ("10.0.0.5", "198.51.100.7", "198.51.100.7"),  # trusted proxy: take the hop before it
        ("10.0.0.5", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # a spoofed leftmost hop is not believed
        ("10.0.0.5", "198.51.100.7, 10.0.0.9", "198.51.100.7"),  # walk across trusted proxies
        ("10.0.0.5", "10.0.0.7, 10.0.0.9", "10.0.0.7"),  # all trusted: the last one seen
        ("10.0.0.5", "garbage, 198.51.100.7", "198.51.100.7"),
        ("10.0.0.5", "198.51.100.7, garbage", "10.0.0.5"),  # malformed nearest hop: stop at the proxy
        ("10.0.0.5", "[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.5", "fe80::1%eth0", "fe80::1"),  # a zone is no client's: dropped
        ("not-an-ip", "1.2.3.4", None),
        # a dual-stack listener's IPv4 peers are IPv4: the trusted proxy is recognised, the client is plain
        ("::ffff:10.0.0.5", "::ffff:198.51.100.7", "198.51.100.7"),
        ("::ffff:203.0.113.9", None, "203.0.113.9"),
    ],
)
def test_client_ip_walks_forwarded_for_from_the_right_across_trusted_proxies(peer, xff, expected):
    assert client_ip_resolve(peer, xff, PROXIES) == expected


def test_request_id_is_kept_when_well_formed_and_replaced_otherwise():
    assert request_id_from("abc-123_DEF.456") == "abc-123_DEF.456"
    for bad in (None, "", "short", "x" * 65, "has space in it", "new\nline-injection"):
        generated = request_id_from(bad)
        assert generated != bad
        assert len(generated) == 32


@pytest.mark.django_db
def test_audit_record_drops_fields_that_could_hold_credentials(caplog):
    event = audit_record(
        kind="test.event",
        data={
            "access_token": "eyJ.secret",
            "client_secret": "s3cr3t",
            "code": "abc",
            "password": "pw",
            "code_verifier": "v",
            "prompt": "hello",
            "scope": "models.read",
            "error_code": "invalid_grant",
        },
    )
    event.refresh_from_db()
    assert event.data == {"scope": "models.read", "error_code": "invalid_grant"}
    assert all(secret not in caplog.text for secret in ("eyJ.secret", "s3cr3t", "hello"))


@pytest.mark.django_db
def test_request_id_and_true_ip_reach_the_audit_record_and_the_response(client, settings):
    settings.PORTCULLIS_TRUSTED_PROXIES = ["127.0.0.1/32"]
    response = client.post(
        "/oauth/token/",
        {"grant_type": "client_credentials", "client_id": "nobody"},
        HTTP_X_REQUEST_ID="req-1234567890",
        HTTP_X_FORWARDED_FOR="6.6.6.6, 198.51.100.7",
        REMOTE_ADDR="127.0.0.1",
    )
    assert response["X-Request-ID"] == "req-1234567890"
    event = AuditEvent.objects.get(kind="token.denied")
    assert event.request_id == "req-1234567890"
    assert event.ip == "198.51.100.7"


def test_access_log_lines_lose_their_query_string():
    import logging

    from audit.context import AccessLogRedactFilter

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/models?access_token=eyJsecret", "1.1", 400),
        None,
    )
    assert AccessLogRedactFilter().filter(record)
    assert "eyJsecret" not in record.getMessage()
    assert "/v1/models?[redacted]" in record.getMessage()


@pytest.mark.django_db
def test_forwarded_proto_is_believed_only_from_a_trusted_proxy(rf, settings):
    from django.http import HttpResponse

    from audit.context import RequestContextMiddleware

    settings.PORTCULLIS_TRUSTED_PROXIES = ["10.0.0.0/8"]
    seen = {}

    def view(request):
        seen["proto"] = request.META.get("HTTP_X_FORWARDED_PROTO")
        return HttpResponse()

    middleware = RequestContextMiddleware(view)
    middleware(rf.get("/", HTTP_X_FORWARDED_PROTO="https", REMOTE_ADDR="203.0.113.5"))
    assert seen["proto"] is None
    middleware(rf.get("/", HTTP_X_FORWARDED_PROTO="https", REMOTE_ADDR="10.1.1.1"))
    assert seen["proto"] == "https"


def test_json_logs_carry_the_request_id_one_object_per_line():
    import json
    import logging

    from audit.context import RequestContextLogFilter, json_log_formatter, request_id_var

    token = request_id_var.set("req-json-logs-1")
    try:
        record = logging.LogRecord(
            "gateway", logging.WARNING, __file__, 1, "upstream %s is down", ("u1",), None
        )
        RequestContextLogFilter().filter(record)
        line = json_log_formatter().format(record)
    finally:
        request_id_var.reset(token)
    parsed = json.loads(line)
    assert parsed["event"] == "upstream u1 is down"
    assert parsed["request_id"] == "req-json-logs-1"
    assert parsed["level"] == "warning"
    assert parsed["logger"] == "gateway"


@pytest.mark.parametrize(
    ("name", "msg", "args", "path_at"),
    [
        ("uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5000", "GET", "{path}", "1.1", 200), 2),
        ("django.request", "%s: %s", ("Not Found", "{path}"), 1),
        ("django.request", "Forbidden (Permission denied): %s", ("{path}",), 0),
        ("django.security.csrf", "Forbidden (%s): %s", ("CSRF cookie not set.", "{path}"), 1),
    ],
)
def test_log_lines_lose_the_user_code_of_the_device_pages(name, msg, args, path_at):
    import logging

    from audit.context import AccessLogRedactFilter

    for page in ("confirm", "status"):
        path = f"/oauth/device/{page}/cli3nt/WDJB-MJHT/"
        filled = tuple(a.format(path=path) if isinstance(a, str) else a for a in args)
        record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, filled, None)
        assert AccessLogRedactFilter().filter(record)
        assert "WDJB-MJHT" not in record.getMessage()
        assert isinstance(record.args, tuple)
        assert record.args[path_at] == f"/oauth/device/{page}/cli3nt/[redacted]/"


def test_djangos_request_warnings_go_through_the_redaction_filter():
    import logging

    from audit.context import AccessLogRedactFilter

    for name in ("uvicorn.access", "django.request", "django.security.csrf"):
        assert any(isinstance(f, AccessLogRedactFilter) for f in logging.getLogger(name).filters), name
