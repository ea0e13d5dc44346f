"""Audit reports: traffic, denials, latency and security events over a period, as HTML, CSV or JSON.

Every traffic number comes from the usage records (one per gateway request, denied ones too), counted
over the half-open period ``[since, until)`` by the record's ``occurred_at``:

- requests: every usage record; tokens in / out: its prompt / completion tokens.
- errors: status >= 500 (a gateway fault, an upstream 502/503/504, revocation state unavailable), plus
  streams whose 200 was already sent and that ended with ``outcome = upstream_error``.
- denied: status 4xx except 499 (a client that left before sending its request is neither). The reason
  is the ``gateway.denied`` event with the same request id; a record without one falls back to its
  outcome (``denied:<reason>``) or its status. Reasons are grouped by :func:`denial_group`.
- latency: total = gateway_ms + upstream_ms over the requests that were not denied (a flood of cheap
  401s would otherwise hide the real latency); p50/p95 by linear interpolation, PostgreSQL's
  ``percentile_cont`` computed in the database there and the same formula in Python elsewhere (SQLite).

Security events: every ``key.*``, token.revoked, token.refresh_reuse, code.replayed, login.locked_out,
anomaly.detected and audit.checkpoint_refused event in the period, counted exactly and listed up to
``EVENT_LIST_LIMIT``. The chain head is read after the events, so it covers every listed event
(``verifyaudit`` can check them against it).

The client and model tables list the ``TABLE_ROWS`` busiest keys, cut in the database (model names are
what clients sent: a period can hold any number); the totals, the denial reasons and the omitted counts
still count every request.
"""

from audit.reports.build import latency_percentiles, period_check, report_build
from audit.reports.data import FORMATS, GENESIS, ReportData, ReportPeriodError
from audit.reports.render import report_from_json, report_render
from audit.reports.store import (
    daily_period,
    report_clock,
    report_save,
    report_store,
    scheduled_reports_store,
    weekly_period,
)

__all__ = [
    "FORMATS",
    "GENESIS",
    "ReportData",
    "ReportPeriodError",
    "daily_period",
    "latency_percentiles",
    "period_check",
    "report_build",
    "report_clock",
    "report_from_json",
    "report_render",
    "report_save",
    "report_store",
    "scheduled_reports_store",
    "weekly_period",
]
