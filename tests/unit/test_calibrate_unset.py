"""`rules calibrate` on data that cannot set a threshold leaves it as it was.

Calibrating the shipped misuse rules on requests alone (a public misuse set: one user turn per
item) used to write ``misuse_answer: -549755813888.861``: the answer rule watches the
assistant's tokens, the data has none, so the search walked to its farthest value without a
firing and wrote it, a threshold at which the rule fires on every answer of real traffic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from monitor.evaluation.calibrate import calibrate, write_thresholds
from monitor.evaluation.engine_replay import EngineReplay, pack_features
from monitor.features.build import build_pack_from_sae, load_sae
from monitor.features.build.conversations import ConversationTokens
from monitor.fixtures import write_layer_sae

RULES = """\
features: {f: p/1}
thresholds:
  on_requests: 0.5   # set below
  on_answers: -0.25  # no answers in the data: stays
rules:
  - {rule: request, severity: info, condition: 'f > on_requests', roles: [user]}
  - {rule: answer, severity: info, condition: 'f > on_answers', roles: [assistant]}
"""


def test_a_threshold_the_data_cannot_set_is_kept_and_not_written(tmp_path: Path) -> None:
    pack = build_pack_from_sae(
        load_sae(write_layer_sae(tmp_path / "sae", 16, 32, 3, seed=1)), [1], "p"
    )
    (hook,) = pack.hook_points
    generator = torch.Generator().manual_seed(3)
    tokens = [
        ConversationTokens(
            f"c{i}",
            0,
            {hook: torch.randn(6, 16, generator=generator) * 3},
            ["user"] * 6,
            torch.ones(6, dtype=torch.bool),
            [6],
        )
        for i in range(40)
    ]
    replay = EngineReplay(tokens, [pack], {"p/1"}, ids=[t.id for t in tokens])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    report = calibrate(replay, [rules], pack_features([pack]), 0.05)

    by_name = {t.name: t for t in report.thresholds}
    answers, requests = by_name["on_answers"], by_name["on_requests"]
    assert answers.kept and answers.new == -0.25 and answers.fired == 0
    assert "not changed" in answers.note and "roles" in answers.note
    assert any("'on_answers' (answer) not changed" in w for w in report.warnings)
    # The other threshold is set by the same run: the user tokens do fire somewhere.
    assert not requests.kept and requests.new != 0.5 and 1 <= requests.fired <= 2
    write_thresholds(report.thresholds)
    text = rules.read_text()
    assert "on_answers: -0.25  # no answers in the data: stays" in text
    assert "on_requests: 0.5 " not in text
