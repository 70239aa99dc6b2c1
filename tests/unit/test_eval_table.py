"""`eval`'s terminal table shows a feature's served pooling whole: the rule must pool that
way to serve the score, so a clipped name would hide what to write in it."""

from __future__ import annotations

import pytest

from monitor.evaluation.evaluate import EvalReport, FeatureResult
from monitor.evaluation.report import table


@pytest.mark.parametrize(
    "aggregation", ["max_rolling_mean:512,for:32,roles", "max_rolling_mean:4096,roles,turn_end"]
)
def test_the_aggregation_column_shows_the_role_masked_whole_turn_mean_whole(aggregation):
    feature = FeatureResult(
        "probes/bias\x1b[31m", aggregation, 0.97, {0.01: (1.0, 0.8, 0.01)}, None
    )
    report = EvalReport(2, 1, 1, [], [feature], 0.1, {})
    text = table(report)
    row = next(line for line in text.splitlines() if line.startswith("probes/bias"))
    assert aggregation in row
    assert "\x1b" not in text  # names from the user's files are escaped
