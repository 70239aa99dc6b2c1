"""What the sidecar hands to Alertmanager is redacted the way the audit store keeps it."""

from __future__ import annotations

from monitor.audit.redaction import Redactor, redact_identifier
from monitor.rules import Firing
from monitor.sidecar.firings import AlertRedaction, _alertmanager_alert


def _firing(conversation_id: str, request_id: str = "") -> Firing:
    return Firing(
        rule="r",
        category="misuse",
        severity="critical",
        conversation_id=conversation_id,
        request_id=request_id,
        position=3,
        row=0,
        value=2.0,
        labels={"team": "t"},
        message=f"fired in {conversation_id}",
        actions=("alert",),
        annotations={"runbook": f"see {conversation_id}"},
    )


def test_ids_go_out_as_the_audit_store_keeps_them() -> None:
    raw = "conv:alice@example.com:7"
    request = "req-+1 415 555 2671"
    alert = _alertmanager_alert("m", _firing(raw, request), raw, AlertRedaction())
    assert alert.conversation_id == redact_identifier(Redactor(), raw)
    assert alert.conversation_id == "conv:[EMAIL]:7#da996837ffb3"
    assert alert.request_id == redact_identifier(Redactor(), request)
    assert "2671" not in alert.request_id
    assert alert.summary == "fired in conv:[EMAIL]:7"
    assert alert.annotations == {"runbook": "see conv:[EMAIL]:7"}
    assert alert.labels == {"team": "t"}


def test_ids_without_personal_data_are_unchanged() -> None:
    alert = _alertmanager_alert("m", _firing("conv-1", "req-1"), "conv-1", AlertRedaction())
    assert (alert.conversation_id, alert.request_id) == ("conv-1", "req-1")
    assert alert.summary == "fired in conv-1"


def test_configured_patterns_apply_as_in_the_audit_store() -> None:
    patterns = (r"EMP-\d{4}",)
    firing = _firing("conv-EMP-1234")
    alert = _alertmanager_alert("m", firing, "conv-EMP-1234", AlertRedaction(patterns))
    assert alert.conversation_id == redact_identifier(Redactor(patterns), "conv-EMP-1234")
    assert "1234" not in alert.conversation_id.split("#")[0]
    assert "EMP-1234" not in alert.summary


def test_rule_fired_log_lines_are_redacted_like_the_audit_store(monkeypatch) -> None:
    from types import SimpleNamespace

    import structlog

    from monitor.outputs.metrics import SidecarMetrics
    from monitor.sidecar import firings
    from monitor.sidecar.firings import log_firing

    raw = "conv:alice@example.com:7"
    request = "req-+1 415 555 2671"
    batch = SimpleNamespace(model="model-of-bob@example.org", seq_no=9)
    # The module's own logger may be cached with an older configuration, and other tests
    # reconfigure structlog (a CLI run with `log_level: error` filters warnings): capture
    # through an unfiltered logger of the test's own.
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(None, processors=[capture], wrapper_class=structlog.BoundLogger)
    monkeypatch.setattr(firings, "log", logger)
    log_firing(SidecarMetrics(), batch, _firing(raw, request), AlertRedaction())  # type: ignore[arg-type]
    (line,) = [entry for entry in capture.entries if entry["event"] == "rule fired"]
    assert line["conversation_id"] == "conv:[EMAIL]:7#da996837ffb3"
    assert "2671" not in line["request_id"] and line["request_id"].startswith("req-")
    assert "bob@example.org" not in line["model"]
    assert line["output"] == "fired in conv:[EMAIL]:7"
    assert line["seq_no"] == 9 and line["position"] == 3
