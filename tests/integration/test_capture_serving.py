"""Capture in every serving pattern, against a real sidecar, with exact accounting.

The sidecar runs "counting" rules: rule seen-L fires when a conversation has shown L
consecutive tokens (`for: L`, an always-true condition). A conversation the sidecar saw as
tokens 0..N-1 with no gap therefore fires exactly seen-1..seen-N, each at position L-1; any
missing, extra or misplaced token shows up as a wrong set or a wrong position.
"""

from __future__ import annotations

import inspect
import signal
import time
import warnings

import pytest
import torch
import transformers as tf

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama, free_port, start_sidecar
from tests.conftest import build_pack_with_cli

HIDDEN = 64
MAX_COUNTED = 48


def counting_rules() -> str:
    lines = ["features: {f: bars/0}", "rules:"]
    for length in range(1, MAX_COUNTED + 1):
        lines += [
            f"  - rule: seen-{length}",
            "    category: accounting",
            "    severity: info",
            "    condition: abs(f) >= 0",
            f"    for: {length}",
        ]
    return "\n".join(lines) + "\n"


def sidecar_config(workdir, port: int = 0) -> dict:
    pack = workdir / "bars.pack.safetensors"
    if not pack.exists():
        build_pack_with_cli(workdir, d_in=HIDDEN, d_sae=32, hook_layer=1, features=[0, 1])
    rules = workdir / "counting.yaml"
    rules.write_text(counting_rules())
    return {"listen": f"127.0.0.1:{port}", "packs": [str(pack)], "rules": [str(rules)]}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("capture-serving")
    process = start_sidecar(sidecar_config(workdir), workdir)
    yield process
    process.stop()


@pytest.fixture
def client(sidecar):
    capture = CaptureClient(sidecar.target, model_name="tiny", metrics_registry=None)
    yield capture
    capture.close(timeout=10)


def seen_tokens(client: CaptureClient, conversation_id: str) -> int:
    """How many contiguous tokens, from position 0, the sidecar saw for a conversation."""
    lengths = []
    for alert in client.alerts:
        if alert.conversation_id != conversation_id:
            continue
        length = int(alert.rule.removeprefix("seen-"))
        assert alert.position == length - 1, (conversation_id, alert.rule, alert.position)
        lengths.append(length)
    assert sorted(lengths) == list(range(1, len(lengths) + 1)), (conversation_id, lengths)
    assert len(lengths) < MAX_COUNTED, "conversation too long for the counting rules"
    return len(lengths)


def generate(model, *args, **kwargs):
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(*args, **kwargs)


def tokens(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def test_left_padded_batch_never_sends_padding(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    ids = tokens([0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6])
    mask = tokens([0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1])
    with client.conversation(["left-short", "left-long"]):
        out = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert client.flush(30)
    assert out.shape[1] == 10
    assert seen_tokens(client, "left-short") == 3 + 4 - 1
    assert seen_tokens(client, "left-long") == 6 + 4 - 1
    assert client.stats.batches_rejected == 0


def test_right_padded_forward(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    ids = tokens([5, 6, 7, 0, 0], [1, 2, 3, 4, 5])
    mask = tokens([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])
    with client.conversation(["right-short", "right-long"]), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert client.flush(30)
    assert seen_tokens(client, "right-short") == 3
    assert seen_tokens(client, "right-long") == 5


def test_sampling_with_several_return_sequences(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    torch.manual_seed(0)
    with client.conversation("sampled"):
        generate(
            model,
            tokens([3, 4, 5, 6]),
            do_sample=True,
            num_return_sequences=3,
            max_new_tokens=5,
            min_new_tokens=5,
        )
    assert client.flush(30)
    assert [seen_tokens(client, f"sampled/{j}") for j in range(3)] == [4 + 5 - 1] * 3


def test_beam_search(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    with client.conversation("beams"):
        generate(model, tokens([3, 4, 5]), num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert client.flush(30)
    assert [seen_tokens(client, f"beams/{j}") for j in range(2)] == [3 + 4 - 1] * 2


def test_chunked_prefill_and_manual_decode_loop(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    prompt = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    # The cache keyword the installed transformers wants (5.24: `cache`; `past_key_values`
    # warns there and goes in 5.40; 5.19 knows only `past_key_values`).
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    cache = {keyword: tf.DynamicCache()}
    with client.conversation("chunked"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword
        for start in range(0, 12, 5):  # chunks of 5, 5, 2
            out = model(prompt[:, start : start + 5], use_cache=True, **cache)
        for _ in range(6):
            next_token = out.logits[:, -1:].argmax(-1)
            out = model(next_token, use_cache=True, **cache)
    assert client.flush(30)
    assert seen_tokens(client, "chunked") == 12 + 6


def test_turns_of_one_conversation_keep_positions(client):
    """A chat server re-runs the whole history each turn; start_position skips what was sent."""
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    turn1 = tokens([5, 6, 7, 8])
    with client.conversation("chat", role="user"), torch.no_grad():
        model(turn1)  # the user's message
    with client.conversation("chat", start_position=0):
        out = generate(model, turn1, max_new_tokens=3, min_new_tokens=3)  # re-runs 0..3
    history = torch.cat([out, tokens([9, 10])], dim=1)  # 4 + 3 + next user message (2)
    with client.conversation("chat", start_position=0):
        generate(model, history, max_new_tokens=2, min_new_tokens=2)
    assert client.flush(30)
    # turn 1 sends positions 0-3; turn 2 re-runs them (skipped) and decodes 4, 5; turn 3
    # re-runs 0-5 (skipped), sends 6-8 and decodes 9: every position exactly once.
    assert seen_tokens(client, "chat") == history.shape[1] + 2 - 1


def test_batched_server_with_explicit_row_ids(client):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    with torch.no_grad():
        with client.conversation(["req-a", "req-b"], role=["assistant", "user"]):
            model(tokens([1, 2, 3], [4, 5, 6]))
        with client.conversation(["req-b", "req-c", "req-a"]):
            model(tokens([7], [8], [9]))
    assert client.flush(30)
    assert seen_tokens(client, "req-a") == 4
    assert seen_tokens(client, "req-b") == 4
    assert seen_tokens(client, "req-c") == 1


FAMILIES = {
    "llama": lambda c: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **c)),
    "mistral": lambda c: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **c)),
    "qwen2": lambda c: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **c)),
    "qwen3": lambda c: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **c)),
    "gemma2": lambda c: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(num_key_value_heads=2, head_dim=16, **c)
    ),
    "gemma3": lambda c: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **c)
    ),
    "gpt2": lambda c: tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=128, n_embd=HIDDEN, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
        )
    ),
    "gpt-neox": lambda c: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**c)),
    "phi": lambda c: tf.PhiForCausalLM(tf.PhiConfig(**c)),
    "phi3": lambda c: tf.Phi3ForCausalLM(tf.Phi3Config(pad_token_id=0, **c)),
    "bert": lambda c: tf.BertModel(tf.BertConfig(**c)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_families(client, family):
    common = dict(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(0)
    model = FAMILIES[family](common).eval()
    prompt = tokens([3, 4, 5, 6, 7])
    with torch.no_grad():
        expected = model(prompt) if family == "bert" else generate(model, prompt, max_new_tokens=3)
    client.attach(model, layers=[1])
    conversation = f"family-{family}"
    with client.conversation(conversation), torch.no_grad():
        got = model(prompt) if family == "bert" else generate(model, prompt, max_new_tokens=3)
    assert client.flush(30)
    if family == "bert":
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert seen_tokens(client, conversation) == 5
    else:
        assert torch.equal(got, expected)  # bit-identical with capture attached
        assert seen_tokens(client, conversation) == 5 + 3 - 1
    assert client.stats.dropped.total() == 0


def test_end_conversation_frees_sidecar_state_and_restarts_positions(client, sidecar):
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    with client.conversation("ending"), torch.no_grad():
        model(tokens([1, 2, 3]))
    client.end_conversation("ending")
    with client.conversation("ending"), torch.no_grad():
        model(tokens([4, 5]))  # a new conversation under the same id starts at 0, no gap
    assert client.flush(30)
    fired = sorted((a.rule, a.position) for a in client.alerts if a.conversation_id == "ending")
    assert fired == sorted(
        [("seen-1", 0), ("seen-2", 1), ("seen-3", 2), ("seen-1", 0), ("seen-2", 1)]
    )
    assert client.stats.batches_rejected == 0


def test_hooks_on_a_layer_the_sidecar_does_not_read_are_rejected_not_fatal(client):
    model = build_tiny_llama(hidden=HIDDEN)
    prompt = tokens([1, 2, 3])
    expected = generate(model, prompt, max_new_tokens=3)
    client.attach(model, layers=[0])  # the pack reads layers.1 only
    with client.conversation("wrong-layer"):
        got = generate(model, prompt, max_new_tokens=3)
    assert client.flush(30)
    assert torch.equal(got, expected)
    assert client.stats.batches_rejected == 3
    assert client.stats.batches_acked == 0


def wait_connected(client: CaptureClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.connected, "client did not connect"


def test_sidecar_killed_restarted_and_paused(tmp_path):
    """kill -9 mid-generation, restart on the same port, then SIGSTOP (a sidecar too slow to
    read): generation always finishes with the same outputs, drops are counted, and the client
    reconnects by itself."""
    port = free_port()
    first = start_sidecar(sidecar_config(tmp_path, port), tmp_path)
    model = build_tiny_llama(hidden=HIDDEN)
    prompt = tokens([3, 1, 4, 1, 5])
    expected = generate(model, prompt, max_new_tokens=6, min_new_tokens=6)
    client = CaptureClient(
        first.target,
        queue_size=64,
        reconnect_backoff=(0.05, 0.2),
        connect_timeout=0.5,
        metrics_registry=None,
    )
    client.attach(model, layers=[1])
    try:
        wait_connected(client)
        with client.conversation("before-kill"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=6, min_new_tokens=6), expected
            )
        assert client.flush(30)
        assert client.stats.batches_acked == 6

        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        with client.conversation("while-down"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=6, min_new_tokens=6), expected
            )
        assert client.flush(30)
        down = client.stats.dropped
        assert down["queue_full"] + down["sidecar_unavailable"] + down["disconnected"] == 6

        second = start_sidecar(sidecar_config(tmp_path, port), tmp_path)
        wait_connected(client)
        with client.conversation("after-restart"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=6, min_new_tokens=6), expected
            )
        assert client.flush(30)
        assert seen_tokens(client, "after-restart") == 5 + 6 - 1

        second.process.send_signal(signal.SIGSTOP)
        acked_before, dropped_before = client.stats.batches_acked, client.stats.dropped.total()
        try:
            with client.conversation("while-paused"):
                for _ in range(3):
                    out = generate(model, prompt, max_new_tokens=6, min_new_tokens=6)
                    assert torch.equal(out, expected)
        finally:
            second.process.send_signal(signal.SIGCONT)
        assert client.flush(30)
        acked = client.stats.batches_acked - acked_before
        dropped = client.stats.dropped.total() - dropped_before
        assert acked + dropped == 18  # every step acknowledged after the pause, or counted
        assert second.stop() == 0
    finally:
        client.close(timeout=5)


def test_local_encoding_sends_features_not_activations(client, sidecar, tmp_path):
    """encode_locally: the pack runs in the serving process; the sidecar skips encoding."""
    import glob

    pack_path = glob.glob(str(sidecar.log_path.parent / "bars.pack.safetensors"))[0]
    local = CaptureClient(sidecar.target, encode_locally=pack_path, metrics_registry=None)
    model = build_tiny_llama(hidden=HIDDEN)
    local.attach(model, layers=[1])
    try:
        with local.conversation("local"):
            generate(model, tokens([1, 2, 3, 4]), max_new_tokens=3, min_new_tokens=3)
        assert local.flush(30)
        assert seen_tokens(local, "local") == 4 + 3 - 1
        assert local.stats.batches_rejected == 0
    finally:
        local.close(timeout=5)


def test_local_encoding_with_another_pack_version_is_rejected(sidecar, tmp_path):
    other = build_pack_with_cli(
        tmp_path, d_in=HIDDEN, d_sae=32, hook_layer=1, features=[0, 1], seed=99
    )
    local = CaptureClient(sidecar.target, encode_locally=other, metrics_registry=None)
    model = build_tiny_llama(hidden=HIDDEN)
    local.attach(model, layers=[1])
    # A CPU model's pack runs in the relay (test_relay_encoding.py): the rejection shows the
    # relay sends feature values under the pack's hash, not the activations.
    assert local.encoding_in == "relay"
    from tests.integration.test_relay_encoding import wait_relay_encoder

    wait_relay_encoder(local)  # before: activations go unencoded, for the sidecar to encode
    try:
        with local.conversation("stale-pack"), torch.no_grad():
            model(tokens([1, 2, 3]))
        assert local.flush(30)
        assert local.stats.batches_rejected == 1
    finally:
        local.close(timeout=5)


def test_float64_model_is_sent_as_fp32(client):
    model = build_tiny_llama(hidden=HIDDEN).double()
    client.attach(model, layers=[1])
    with client.conversation("fp64"), torch.no_grad():
        model(tokens([1, 2, 3, 4, 5]))
    assert client.flush(30)
    assert seen_tokens(client, "fp64") == 5


def test_meta_device_model_is_refused_at_attach(client):
    with torch.device("meta"):
        model = build_tiny_llama(hidden=HIDDEN)
    with pytest.raises(ValueError, match="meta device"):
        client.attach(model, layers=[1])


def test_fail_closed_waits_then_counts(tmp_path):
    """on_full='block': a step waits for room up to block_timeout, then is dropped and
    counted; the model still finishes."""
    client = CaptureClient(
        f"127.0.0.1:{free_port()}",
        queue_size=1,
        on_full="block",
        block_timeout=0.05,
        metrics_registry=None,
    )
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    try:
        with client.conversation("closed"):
            out = generate(model, tokens([1, 2, 3]), max_new_tokens=4, min_new_tokens=4)
        assert out.shape[1] == 7
        assert client.stats.steps_captured == 4
        assert client.stats.dropped["queue_full"] == 3  # the first step holds the only slot
    finally:
        client.close(timeout=1)  # the one queued step can never be sent: nothing is up


def test_token_text_from_a_real_tokenizer(sidecar):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")
    batch = tokenizer(["w5 w6 w7", "w9"], return_tensors="pt", padding=True)
    client = CaptureClient(sidecar.target, tokenizer=tokenizer, metrics_registry=None)
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    try:
        with client.conversation(["text-a", "text-b"]), torch.no_grad():
            model(**batch)
        assert client.flush(30)
        # The sidecar checks one token text per real row; a mismatch would be rejected.
        assert client.stats.batches_acked == 1 and client.stats.batches_rejected == 0
        assert seen_tokens(client, "text-a") == 3
        assert seen_tokens(client, "text-b") == 1
    finally:
        client.close(timeout=5)


class _TupleLayer(torch.nn.Module):
    """A decoder layer in the transformers 4.x style: returns a tuple, hidden states first."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return hidden + self.linear(hidden), None


class _TupleModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, HIDDEN)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_TupleLayer(), _TupleLayer()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden)[0]
        return hidden


def test_layers_returning_tuples_like_transformers_4(client):
    model = _TupleModel().eval()
    client.attach(model, layers=[1])
    with client.conversation("tuple-layers"), torch.no_grad():
        model(tokens([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]))  # one id, two rows: 'tuple-layers/0', /1
    assert client.flush(30)
    assert seen_tokens(client, "tuple-layers/0") == 5
    assert seen_tokens(client, "tuple-layers/1") == 5


def test_end_conversation_with_local_encoding_and_several_sequences(sidecar):
    import glob

    pack_path = glob.glob(str(sidecar.log_path.parent / "bars.pack.safetensors"))[0]
    client = CaptureClient(sidecar.target, encode_locally=pack_path, metrics_registry=None)
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    try:
        for _ in range(2):  # the second run reuses the id: it must start again at position 0
            with client.conversation("ended-beams"):
                generate(model, tokens([1, 2, 3]), num_beams=2, max_new_tokens=2, min_new_tokens=2)
            client.end_conversation("ended-beams")
        assert client.flush(30)
        assert client.stats.batches_rejected == 0
        for j in range(2):
            fired = sorted(
                (a.rule, a.position)
                for a in client.alerts
                if a.conversation_id == f"ended-beams/{j}"
            )
            once = [("seen-1", 0), ("seen-2", 1), ("seen-3", 2), ("seen-4", 3)]
            assert fired == sorted(once + once)
    finally:
        client.close(timeout=5)
