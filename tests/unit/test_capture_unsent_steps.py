"""The hooks' early exit while the sidecar is down (fail-open): a step the client would drop
as `sidecar_unavailable` is decided as its forward pass begins, and then nothing of it is
copied, encoded or assembled, while the conversations' positions move on exactly as if it had
been sent, so the first step sent after the sidecar returns has its true positions."""

from __future__ import annotations

import torch

from monitor.capture.hooks import ConversationContext, PositionLedger, StepAssembler


class _Switch:
    def __init__(self) -> None:
        self.down = False
        self.unsent = 0
        self.encoded = 0

    def encode(self, hook_point, hidden):
        self.encoded += 1
        return {}


def _assembler(switch: _Switch, emitted: list, ledger: PositionLedger) -> StepAssembler:
    return StepAssembler(
        ["layers.0", "layers.1"],
        ledger,
        emitted.append,
        lambda reason: None,
        want_token_ids=True,
        local_encoder=switch.encode,
        dropping=lambda: switch.down,
        unsent=lambda: setattr(switch, "unsent", switch.unsent + 1),
    )


def _forward(assembler: StepAssembler, context, hidden, mask=None) -> None:
    token_ids = torch.ones(hidden.shape[:2], dtype=torch.long)
    kwargs = {"attention_mask": mask} if mask is not None else {}
    assembler.begin((token_ids,), kwargs)
    assembler.layer_output("layers.0", hidden, context)
    assembler.layer_output("layers.1", hidden, context)


def test_steps_while_down_are_not_assembled_but_move_positions_on():
    switch, emitted, ledger = _Switch(), [], PositionLedger()
    assembler = _assembler(switch, emitted, ledger)
    context = ConversationContext(("a", "b"), ("user", "user"), ("ra", "rb"))
    _forward(assembler, context, torch.zeros(2, 3, 4))  # up: a prefill of 3
    assert [step.positions for step in emitted] == [[0, 0]]
    assert switch.encoded == 2

    switch.down = True
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # a left-padded row: its real tokens count
    _forward(assembler, context, torch.zeros(2, 4, 4), mask)
    _forward(assembler, context, torch.zeros(2, 1, 4))
    assert len(emitted) == 1 and switch.unsent == 2
    assert switch.encoded == 2  # nothing encoded while down

    switch.down = False
    _forward(assembler, context, torch.zeros(2, 1, 4))
    step = emitted[-1]
    assert step.positions == [3 + 3 + 1, 3 + 4 + 1]
    assert step.token_ids is not None and set(step.layers) == {"layers.0", "layers.1"}


def test_the_decision_is_taken_once_as_the_forward_begins():
    switch, emitted, ledger = _Switch(), [], PositionLedger()
    assembler = _assembler(switch, emitted, ledger)
    context = ConversationContext(("a",), ("user",), ("ra",))
    token_ids = torch.ones(1, 2, dtype=torch.long)
    assembler.begin((token_ids,), {})
    switch.down = True  # goes down in the middle of the forward: this step is still assembled
    assembler.layer_output("layers.0", torch.zeros(1, 2, 4), context)
    assembler.layer_output("layers.1", torch.zeros(1, 2, 4), context)
    assert len(emitted) == 1 and switch.unsent == 0
    # Without the model's pre-hook, the first layer's hook decides.
    assembler.layer_output("layers.0", torch.zeros(1, 1, 4), context)
    switch.down = False
    assembler.layer_output("layers.1", torch.zeros(1, 1, 4), context)
    assert len(emitted) == 1 and switch.unsent == 1
    assert ledger.peek("a") == 3


def test_untagged_forwards_are_still_counted_as_untagged_while_down():
    switch, emitted, ledger = _Switch(), [], PositionLedger()
    drops = []
    assembler = StepAssembler(
        ["layers.0"],
        ledger,
        emitted.append,
        drops.append,
        want_token_ids=False,
        dropping=lambda: True,
        unsent=lambda: setattr(switch, "unsent", switch.unsent + 1),
    )
    assembler.layer_output("layers.0", torch.zeros(1, 1, 4), None)
    assert drops == ["untagged"] and switch.unsent == 0
