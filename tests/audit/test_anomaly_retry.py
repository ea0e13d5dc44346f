"""A finding whose handler fails is not recorded, so the next run finds it again and its quarantine happens;
the other findings of the run are recorded and handled all the same."""

from __future__ import annotations

import logging

import pytest
from django.db import OperationalError

from audit import anomaly
from audit.anomaly import Finding, anomalies_detect
from audit.models import AnomalyScan, AuditEvent
from audit.services import audit_record
from tests.audit.test_anomaly import NOW, usage

pytestmark = pytest.mark.django_db


def _burst(ip: str) -> None:
    for i in range(25):
        usage("burst", ago_s=i, status=401, ip=ip, token_id="")


def _findings() -> list[str]:
    return sorted(e.data["evidence"]["ip"] for e in AuditEvent.objects.filter(kind="anomaly.detected"))


def test_a_finding_whose_handler_failed_is_handled_by_the_next_run(monkeypatch, caplog):
    quarantined: list[str] = []

    def quarantine(finding: Finding) -> None:
        # what the gateway's handler does: its own audited writes, then (here, once) a database failure
        audit_record(kind="client.disabled", actor="system:anomaly", client_id=finding.client_id)
        if not quarantined:
            quarantined.append("failed")
            raise OperationalError("the connection was lost while quarantining")
        quarantined.append(finding.key)

    monkeypatch.setattr(anomaly, "_handlers", [quarantine])
    _burst("203.0.113.9")
    with caplog.at_level(logging.ERROR, logger="audit.anomaly"), pytest.raises(OperationalError):
        anomalies_detect(now=NOW)
    assert _findings() == []  # rolled back with the handler's work...
    assert not AuditEvent.objects.filter(kind="client.disabled").exists()
    assert not AnomalyScan.objects.exists()  # ...and the marks did not move past what was read
    assert "a handler failed; the next run tries again" in caplog.text

    found = anomalies_detect(now=NOW)  # the next minute's run
    assert [f.rule for f in found] == ["denial_burst"]
    assert quarantined == ["failed", found[0].key]
    assert _findings() == ["203.0.113.9"]
    assert AuditEvent.objects.filter(kind="client.disabled").count() == 1

    assert anomalies_detect(now=NOW) == []  # recorded and handled: once
    assert quarantined == ["failed", found[0].key]


def test_a_failing_handler_does_not_hold_back_the_other_findings_of_the_run(monkeypatch):
    handled: list[str] = []

    def quarantine(finding: Finding) -> None:
        if finding.evidence["ip"] == "203.0.113.9":
            raise OperationalError("a deadlock, for this one")
        handled.append(finding.evidence["ip"])

    monkeypatch.setattr(anomaly, "_handlers", [quarantine])
    _burst("203.0.113.9")
    _burst("198.51.100.7")
    with pytest.raises(OperationalError):
        anomalies_detect(now=NOW)
    assert handled == ["198.51.100.7"]
    assert _findings() == ["198.51.100.7"]

    monkeypatch.setattr(anomaly, "_handlers", [lambda finding: handled.append(finding.evidence["ip"])])
    assert [f.evidence["ip"] for f in anomalies_detect(now=NOW)] == ["203.0.113.9"]  # only what failed
    assert handled == ["198.51.100.7", "203.0.113.9"]
    assert _findings() == ["198.51.100.7", "203.0.113.9"]
