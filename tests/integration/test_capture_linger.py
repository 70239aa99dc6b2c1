"""The relay's linger against a real `safety-monitor serve`: the same captured stream sent one
message per step and with a linger (several steps per message) gives the same alerts and the
same audit trail, in fewer messages.

The stream (transformers client, tiny Llama, token text from a tokenizer): two conversations
generated as one batch (prefill with the prompt's turn end, then decodes), one more pass that
ends both answers' turns, a third conversation generated on its own, and an end. The rules:
test_capture_serving's counting rules (every token once, in order, at the right position), a
turn-end rule, and an audited rule with a feature-dependent condition, so the audit store
holds token windows and feature values to compare.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from monitor.audit import open_store
from monitor.audit.store import AuditQuery
from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama, start_sidecar
from tests.integration.test_capture_serving import (
    HIDDEN,
    generate,
    sidecar_config,
    tokens,
    wait_connected,
)
from tests.integration.test_capture_turn_ends import TURN_END_RULE

AUDITED_RULE = """  - rule: audited
    category: misuse
    severity: warning
    condition: f > 0
    actions: [alert, audit]
    output: "{value} at {position}"
"""
LINGER_MS = 100.0


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}  # the tiny model's whole vocabulary
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _run(workdir: Path, linger_ms: float, model, tokenizer) -> tuple[list, dict, object]:  # type: ignore[no-untyped-def]
    """Start a fresh sidecar, send the stream with `linger_ms`; the alerts the client got
    (all but seq_no), the audit store's conversations and the client's stats."""
    workdir.mkdir()
    config = sidecar_config(workdir)
    rules = Path(config["rules"][0])
    rules.write_text(rules.read_text() + TURN_END_RULE + AUDITED_RULE)
    database = workdir / "audit.db"
    config["audit"] = {"url": f"sqlite:///{database}"}
    sidecar = start_sidecar(config, workdir)
    client = CaptureClient(
        sidecar.target,
        model_name="tiny",
        metrics_registry=None,
        tokenizer=tokenizer,
        linger_ms=linger_ms,
    )
    try:
        client.attach(model, layers=[1])
        wait_connected(client)  # else the steps wait on the ring, and merge whatever the linger
        _stream(client, model)
        assert client.flush(60)
        stats = client.stats
    finally:
        client.close(timeout=10)
        sidecar.stop()
    alerts = sorted(
        (
            *(a.conversation_id, a.position, a.rule, a.request_id, a.value, a.message),
            *(a.actions, tuple(sorted(a.labels.items()))),
        )
        for a in client.alerts
    )
    store = open_store(f"sqlite:///{database}")
    try:
        conversations = {}
        for summary in store.list_conversations(AuditQuery(limit=None)):
            record = store.get_conversation(summary.conversation_id)
            assert record is not None and not record.warnings
            conversations[summary.conversation_id] = (
                summary.ended,
                summary.token_count,
                [
                    (t.position, t.text, t.role, t.request_id, dict(t.features))
                    for t in record.tokens
                ],
                sorted(
                    (
                        *(a.position, a.rule, a.value, a.start, a.end, a.message),
                        *(repr(sorted(a.feature_values.items())), a.request_id),
                    )
                    for a in record.alerts
                ),
            )
    finally:
        store.close()
    return alerts, conversations, stats


def _stream(client: CaptureClient, model) -> None:  # type: ignore[no-untyped-def]
    prompt = tokens([3, 4, 5, 6, 7], [8, 9, 10, 11, 12])
    with client.conversation(["conv-a", "conv-b"], prompt_role="user"):
        out = generate(
            model, prompt, max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True
        )
    new = "cache" in inspect.signature(model.forward).parameters
    cache = {"cache": out.cache} if new else {"past_key_values": out.past_key_values}
    with client.conversation(["conv-a", "conv-b"], turn_end=True), torch.no_grad():
        model(input_ids=out.sequences[:, -1:], **cache)
    with client.conversation("conv-c", prompt_role="user", attributes={"tenant": "t1"}):
        generate(model, tokens([20, 21, 22]), max_new_tokens=10, min_new_tokens=10)
    client.end_conversation("conv-a")


@pytest.mark.timeout(300)
def test_a_linger_sends_fewer_messages_with_identical_alerts_and_audit(tmp_path):
    model = build_tiny_llama(hidden=HIDDEN)
    tokenizer = _tokenizer()
    alerts, audit, stats = _run(tmp_path / "step-by-step", 0.0, model, tokenizer)
    lingered_alerts, lingered_audit, lingered = _run(
        tmp_path / "lingered", LINGER_MS, model, tokenizer
    )
    # The stream is what we think: every conversation counted, turn ends fired, audited.
    rules = {rule for _, _, rule, *_ in alerts}
    assert {"seen-1", "seen-17", "turn-end", "audited"} <= rules
    assert {"conv-a", "conv-b", "conv-c"} <= set(audit)
    assert audit["conv-a"][0] is True  # ended
    assert lingered_alerts == alerts
    assert lingered_audit == audit
    # The same steps, all acked, none dropped; one message per step without a linger.
    for s in (stats, lingered):
        assert s.batches_sent == s.batches_acked == s.steps_captured  # the end message too
        assert not s.dropped and s.batches_rejected == 0
    assert lingered.batches_sent == stats.batches_sent
    assert stats.messages_sent == stats.batches_sent
    assert lingered.messages_sent < stats.messages_sent, (lingered, stats)


@pytest.mark.timeout(120)
def test_flush_does_not_wait_out_the_linger(tmp_path):
    """While the serving process waits for verdicts (flush, wait_settled: the vLLM guard's
    `block_within`), the relay sends at once: a flush well inside a 1 s linger settles."""
    sidecar = start_sidecar(sidecar_config(tmp_path), tmp_path)
    client = CaptureClient(sidecar.target, metrics_registry=None, linger_ms=1000.0)
    try:
        model = build_tiny_llama(hidden=HIDDEN)
        client.attach(model, layers=[1])
        wait_connected(client)
        for start in range(3):
            with client.conversation("solo", start_position=start), torch.no_grad():
                model(input_ids=tokens([5 + start]))
            assert client.wait_settled(0, timeout=0.6), start
        with client.conversation("solo", start_position=3), torch.no_grad():
            model(input_ids=tokens([9]))
        assert client.flush(0.6)
        assert client.stats.batches_acked == 4
    finally:
        client.close(timeout=10)
        sidecar.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("queue_size", "buffer_bytes"),
    [(16, 64 << 20), (256, 8192)],
    ids=["few-steps", "few-bytes"],
)
def test_a_long_linger_drops_nothing_from_a_small_ring(tmp_path, queue_size, buffer_bytes):
    """A linger ends early once about half the ring (the client's queue_size, or its bytes)
    waits: with a 16-step queue or an 8 KiB ring and a 1 s linger, a fail-closed client whose
    model waits at most 0.5 s for room drops no step. A linger that did not end early would
    hold a full ring for 1 s, so the model's wait would time out and drop steps.

    Fail-closed, not fail-open: a fail-open client drops a step whenever its ring is full,
    linger or not, so on a loaded machine (a relay descheduled for a few ms while the tiny
    model writes many steps) an 8 KiB ring overflows without any linger; that made this test
    flaky when it was fail-open. The bounded wait isolates what the linger controls."""
    sidecar = start_sidecar(sidecar_config(tmp_path), tmp_path)
    client = CaptureClient(
        sidecar.target,
        model_name="tiny",
        metrics_registry=None,
        linger_ms=1000.0,
        queue_size=queue_size,
        buffer_bytes=buffer_bytes,
        on_full="block",
        block_timeout=0.5,
    )
    try:
        model = build_tiny_llama(hidden=HIDDEN)
        client.attach(model, layers=[1])
        wait_connected(client)
        for turn in range(3):
            with client.conversation(f"c{turn}"):
                generate(model, tokens([3, 4, 5]), max_new_tokens=40, min_new_tokens=40)
        assert client.flush(60)
        stats = client.stats
    finally:
        client.close(timeout=10)
        sidecar.stop()
    assert not stats.dropped, stats
    assert stats.steps_captured == stats.batches_acked == 3 * 40, stats
    assert stats.messages_sent < stats.batches_sent, stats  # it did linger


@pytest.mark.timeout(300)
def test_merged_messages_respect_the_sidecars_limits(tmp_path):
    """A sidecar that takes 4 rows per batch gets merged messages of at most 4 rows: the steps
    it accepts one by one are accepted merged too (none rejected)."""
    config = sidecar_config(tmp_path)
    config["limits"] = {"max_rows_per_batch": 4}
    sidecar = start_sidecar(config, tmp_path)
    client = CaptureClient(
        sidecar.target, model_name="tiny", metrics_registry=None, linger_ms=1000.0
    )
    try:
        model = build_tiny_llama(hidden=HIDDEN)
        client.attach(model, layers=[1])
        wait_connected(client)
        with client.conversation("c"):
            generate(model, tokens([3, 4, 5]), max_new_tokens=8, min_new_tokens=8)
        assert client.flush(30)
        stats = client.stats
    finally:
        client.close(timeout=10)
        sidecar.stop()
    assert stats.batches_rejected == 0, stats
    assert stats.batches_acked == stats.steps_captured == 8, stats
    assert stats.rows_acked == 3 + 7, stats  # the prompt, then one row per decode
    assert stats.messages_sent < stats.batches_sent, stats  # merged, up to 4 rows each
