"""The `block` action (guard mode): declared like alert/audit, validated, and carried on the
alert the sidecar streams back so an engine integration can stop the request."""

from __future__ import annotations

import pytest

from monitor.rules.engine import Firing
from monitor.rules.errors import RuleLoadError
from monitor.rules.loader import load_rules
from monitor.sidecar.firings import alert_event


def write(tmp_path, actions: str):
    path = tmp_path / "guard.yaml"
    path.write_text(
        "features: {f: bars/0}\n"
        "rules:\n"
        "  - rule: stop-it\n"
        "    severity: critical\n"
        "    condition: f > 1\n"
        f"    actions: {actions}\n"
    )
    return path


def test_block_is_an_action(tmp_path):
    ruleset = load_rules([write(tmp_path, "[alert, block]")], known_features={"bars/0"})
    assert ruleset.rules[0].actions == ("alert", "block")


def test_unknown_action_is_still_refused(tmp_path):
    with pytest.raises(RuleLoadError, match="blok"):
        load_rules([write(tmp_path, "[blok]")], known_features={"bars/0"})


def test_the_alert_on_the_stream_carries_the_actions():
    firing = Firing(
        rule="stop-it",
        category="misuse",
        severity="critical",
        conversation_id="c",
        request_id="r",
        position=7,
        row=0,
        value=2.0,
        labels={},
        message="m",
        actions=("alert", "block"),
    )
    assert list(alert_event(3, firing).alert.actions) == ["alert", "block"]
