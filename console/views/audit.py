"""Audit pages: browse and filter events, export them as CSV, verify the hash chain, download reports."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_http_methods

from audit.locks import advisory_lock_tried
from audit.models import AuditEvent, AuditReport
from audit.selectors import audit_events_filter, audit_kinds, reports_list
from console.access import console_view
from console.forms import AuditFilterForm
from console.views.common import paginate

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("occurred_at", "kind", "outcome", "actor", "client_id", "ip", "request_id", "seq", "data")
EXPORT_CHUNK = 2000  # events read from the database at a time
REPORT_TYPES = {"html": "text/html", "csv": "text/csv", "json": "application/json"}


@console_view()
@require_http_methods(["GET"])
def audit_list(request: HttpRequest) -> HttpResponse:
    """Browse audit events, filtered by time, actor, client, kind and outcome."""
    form = AuditFilterForm(request.GET or None)
    events = audit_events_filter(**form.filters())
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "form": form,
        "page": paginate(request, events),
        "query": query.urlencode(),
        "kinds": audit_kinds(),
    }
    return render(request, "console/audit/list.html", context)


def csv_cell(value: Any) -> str:
    """Render a value for a CSV cell, defusing spreadsheet formulas (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_line(writer: Any, event: AuditEvent) -> str:
    row = [getattr(event, name) for name in CSV_COLUMNS[:-1]]
    row[0] = event.occurred_at.isoformat()
    return str(writer.writerow([csv_cell(v) for v in [*row, json.dumps(event.data, sort_keys=True)]]))


def _export_page(events: QuerySet[AuditEvent], after: AuditEvent | None) -> QuerySet[AuditEvent]:
    """Return the export's next page: the events after ``after`` in its order, newest first.

    Keyset pages, each one complete query: no server-side cursor is held open between pages, so a client
    that goes away mid-export leaves nothing behind (a ``.iterator()`` cursor outlives the response).
    """
    if after is not None:
        older = Q(occurred_at__lt=after.occurred_at) | Q(occurred_at=after.occurred_at, pk__lt=after.pk)
        # the bound alone is what the occurred_at index can start from (the OR it cannot): without it each
        # page scanned every event already exported (140 ms a page at 400,000 rows, against 1.2 ms)
        events = events.filter(older, occurred_at__lte=after.occurred_at)
    return events.order_by("-occurred_at", "-pk")[:EXPORT_CHUNK]


def _csv_page(writer: Any, page: list[AuditEvent]) -> str:
    return "".join(_csv_line(writer, event) for event in page)


def _csv_rows(events: QuerySet[AuditEvent]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    page = list(_export_page(events, None))
    while page:
        yield _csv_page(writer, page)
        if len(page) < EXPORT_CHUNK:
            break
        page = list(_export_page(events, page[-1]))


async def _csv_rows_async(events: QuerySet[AuditEvent]) -> AsyncIterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    # ``async for`` over a queryset fetches it whole in a worker thread (not ``aiterator()``'s cursor).
    page = [event async for event in _export_page(events, None)]
    while page:
        yield _csv_page(writer, page)
        if len(page) < EXPORT_CHUNK:
            break
        page = [event async for event in _export_page(events, page[-1])]


@console_view()
@require_http_methods(["GET"])
def audit_export(request: HttpRequest) -> StreamingHttpResponse:
    """Export the filtered audit events as CSV (streamed, so any size works).

    Under ASGI the rows come from an asynchronous iterator: Django's ASGI handler would read a synchronous
    one whole into memory before sending a byte (and warn). Either way they are read in keyset pages.
    """
    events = audit_events_filter(**AuditFilterForm(request.GET or None).filters())
    rows = _csv_rows_async(events) if isinstance(request, ASGIRequest) else _csv_rows(events)
    response = StreamingHttpResponse(rows, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="portcullis-audit.csv"'
    response["Cache-Control"] = "no-store"
    return response


# PostgreSQL advisory lock id ("audv") held while the console verifies the chain: one verification at a
# time across the deployment. It reads every record; any staff user may ask, and asking again and again
# had run as many at once.
CONSOLE_VERIFY_LOCK = 0x61756476


def chain_verification() -> dict[str, Any]:
    """Run the audit chain verification if this build has it and none is running; say so otherwise."""
    try:
        from audit.chain import chain_verify
    except ImportError:
        return {"available": False}
    with advisory_lock_tried(CONSOLE_VERIFY_LOCK) as mine:
        if not mine:
            return {"available": True, "busy": True}
        report = chain_verify()
    return {
        "available": True,
        "ok": bool(report.ok),
        "checked": int(report.checked),
        "first_bad_seq": getattr(report, "first_bad_seq", None),
        "reason": str(getattr(report, "reason", "")),
    }


@console_view()
@require_http_methods(["GET", "POST"])
def audit_verify(request: HttpRequest) -> HttpResponse:
    """Verify the audit hash chain on request (POST) and show the result."""
    result = chain_verification() if request.method == "POST" else None
    status = 409 if result is not None and result.get("busy") else 200
    return render(request, "console/audit/verify.html", {"result": result}, status=status)


@console_view()
@require_http_methods(["GET"])
def report_list(request: HttpRequest) -> HttpResponse:
    """List stored audit reports."""
    return render(request, "console/audit/reports.html", {"page": paginate(request, reports_list())})


@console_view()
@require_http_methods(["GET"])
def report_download(request: HttpRequest, pk: int) -> HttpResponse:
    """Download one stored report as an attachment (never rendered inline)."""
    report = get_object_or_404(AuditReport, pk=pk)
    response = HttpResponse(report.content, content_type=f"{REPORT_TYPES.get(report.format, 'text/plain')}")
    response["Content-Disposition"] = f'attachment; filename="{report.filename()}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
