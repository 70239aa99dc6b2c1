"""Issue 14, sidecar side, against a real `safety-monitor serve` process on loopback: limits
on what one message and one stream may hold, streams refused or closed at the stream limits,
conversation state scoped by client identity, fair eviction between clients, clean errors for
undecodable messages, the Bearer scheme in any case, and the bound on how long one abusive
client can delay another client's acks."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from monitor.fixtures import SidecarProcess, start_sidecar
from monitor.wire import encode_tensor, pb, pb_grpc
from tests.conftest import build_pack_with_cli

D_MODEL = 32
HOOK = "layers.1"
TOKENS = {"alice": "alice-secret-token", "mallory": "mallory-secret-token"}
EVENT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hardening")
    build_pack_with_cli(directory, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1, 2, 3])
    (directory / "rules.yaml").write_text(
        "features: {one: bars/1}\n"
        "rules:\n"
        "  - {rule: eight, category: misuse, severity: info, condition: one > -1e9, for: 8}\n"
    )
    for name, token in TOKENS.items():
        (directory / f"{name}.token").write_text(token + "\n")
    return directory


@pytest.fixture(scope="module")
def sidecar(workdir) -> Iterator[SidecarProcess]:
    process = start_sidecar(
        {
            "packs": [str(workdir / "bars.pack.safetensors")],
            "rules": [str(workdir / "rules.yaml")],
            "limits": {
                "max_sequences_per_batch": 64,
                "max_conversations": 32,
                "max_request_id_length": 16,
                "max_role_length": 12,
                "max_model_length": 20,
                "max_attributes": 2,
                "max_attribute_value_length": 8,
                "max_streams": 4,
                "stream_idle_timeout_seconds": 3,
            },
            "security": {"token_files": {n: str(workdir / f"{n}.token") for n in TOKENS}},
        },
        workdir,
    )
    yield process
    process.stop()


def batch(seq_no: int, sequences: list[pb.Sequence], model: str = "m") -> pb.StepBatch:
    rows = sum(s.rows for s in sequences)
    message = pb.StepBatch(seq_no=seq_no, model=model, sequences=sequences)
    message.layers.append(
        pb.Layer(hook_point=HOOK, activations=encode_tensor(torch.randn(rows, D_MODEL)))
    )
    return message


def seq(conversation: str, rows: int = 1, position: int = 0, **fields) -> pb.Sequence:
    return pb.Sequence(conversation_id=conversation, rows=rows, position=position, **fields)


def auth(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


class Stream:
    """One Monitor stream: send batches, read events with a timeout (a reader thread)."""

    def __init__(self, target: str, client: str | None = "alice") -> None:
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        self.call = pb_grpc.SafetyMonitorStub(self.channel).Monitor(
            iter(self.outgoing.get, None), metadata=auth(client) if client else None
        )
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as exc:
            self.error = exc
        self.events.put(None)

    def send(self, message: pb.StepBatch) -> None:
        self.outgoing.put(message)

    def closing(self, timeout: float = EVENT_TIMEOUT) -> tuple[list[pb.Alert], pb.MonitorEvent]:
        """The alerts of the next batch and its ack or error."""
        alerts = []
        while True:
            event = self.events.get(timeout=timeout)
            assert event is not None, f"stream ended: {self.error}"
            if event.HasField("alert"):
                alerts.append(event.alert)
            else:
                return alerts, event

    def ended(self, timeout: float) -> grpc.RpcError | None:
        """Wait for the stream to end; the error it ended with."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.events.get(timeout=deadline - time.monotonic()) is None:
                    return self.error
            except queue.Empty:
                break
        raise AssertionError(f"stream still open after {timeout} s")

    def close(self) -> None:
        self.outgoing.put(None)
        self.channel.close()


def expect_error(stream: Stream, message: pb.StepBatch, reason: str, field: str) -> str:
    stream.send(message)
    _, event = stream.closing()
    assert event.HasField("error"), event
    assert (event.error.seq_no, event.error.reason, event.error.field) == (
        message.seq_no,
        reason,
        field,
    )
    return event.error.message


def expect_ack(stream: Stream, message: pb.StepBatch) -> list[pb.Alert]:
    stream.send(message)
    alerts, event = stream.closing()
    assert event.HasField("ack") and event.ack.seq_no == message.seq_no, event
    return alerts


# --------------------------------------------------------------------------- per message


def test_message_limits_are_located_batch_errors(sidecar):
    stream = Stream(sidecar.target)
    try:
        many = [seq(f"s{i}", rows=0) for i in range(65)]
        text = expect_error(stream, batch(1, many), "too_many_sequences", "sequences")
        assert text == "sequences: 65 sequences exceed the limit of 64 per batch"
        conversations = [seq(f"s{i}") for i in range(33)]
        text = expect_error(stream, batch(2, conversations), "too_many_conversations", "sequences")
        assert "33 conversations in one batch exceed max_conversations (32)" in text
        expect_error(stream, batch(3, [seq("a")], model="m" * 21), "too_long", "model")
        long_request = seq("a", request_id="r" * 17)
        expect_error(stream, batch(4, [long_request]), "too_long", "sequences[0].request_id")
        expect_error(stream, batch(5, [seq("a", role="r" * 13)]), "too_long", "sequences[0].role")
        three = seq("a", attributes={"x": "1", "y": "2", "z": "3"})
        expect_error(stream, batch(6, [three]), "too_many_attributes", "sequences[0].attributes")
        long_value = seq("a", attributes={"tenant": "t" * 9})
        where = "sequences[0].attributes['tenant']"
        text = expect_error(stream, batch(7, [long_value]), "too_long", where)
        assert text.endswith("9 characters exceed the limit of 8")
        expect_ack(stream, batch(8, [seq("a", request_id="r" * 16, role="assistant")]))
    finally:
        stream.close()
    assert sidecar.metric("safety_monitor_batches_rejected_total", reason="internal") == 0


def test_zero_row_sequences_take_no_conversation_state(sidecar):
    stream = Stream(sidecar.target)
    try:
        expect_ack(stream, batch(1, [seq("zero-real")]))
        before = sidecar.metric("safety_monitor_conversations")
        ghosts = [seq(f"ghost-{i}", rows=0) for i in range(30)] + [seq("zero-real", position=1)]
        expect_ack(stream, batch(2, ghosts))
        assert sidecar.metric("safety_monitor_conversations") == before
        expect_ack(stream, batch(3, [seq("zero-real", rows=0, end=True)]))
    finally:
        stream.close()


# --------------------------------------------------------------------------- clients


def test_client_b_cannot_end_client_a_conversation(sidecar):
    alice, mallory = Stream(sidecar.target, "alice"), Stream(sidecar.target, "mallory")
    try:
        assert expect_ack(alice, batch(1, [seq("shared-id", rows=4)])) == []
        # mallory ends (and restarts) a conversation of the same id: in her own scope
        expect_ack(mallory, batch(1, [seq("shared-id", rows=0, end=True)]))
        expect_ack(mallory, batch(2, [seq("shared-id", rows=2)]))
        alerts = expect_ack(alice, batch(2, [seq("shared-id", rows=4, position=4)]))
        assert [(a.conversation_id, a.position) for a in alerts] == [("shared-id", 7)]
    finally:
        alice.close()
        mallory.close()


def test_a_flood_of_new_ids_does_not_evict_another_clients_conversation(sidecar):
    alice, mallory = Stream(sidecar.target, "alice"), Stream(sidecar.target, "mallory")
    try:
        evicted = sidecar.metric("safety_monitor_conversations_evicted_total")
        assert expect_ack(alice, batch(1, [seq("patient", rows=4)])) == []
        for i in range(10):  # 300 new conversations against a cap of 32
            flood = [seq(f"flood-{i}-{j}") for j in range(30)]
            expect_ack(mallory, batch(i, flood))
        assert sidecar.metric("safety_monitor_conversations_evicted_total") > evicted
        alerts = expect_ack(alice, batch(2, [seq("patient", rows=4, position=4)]))
        assert [(a.conversation_id, a.position) for a in alerts] == [("patient", 7)]
    finally:
        alice.close()
        mallory.close()


# --------------------------------------------------------------------------- streams


def test_streams_over_the_limit_are_refused_and_idle_ones_closed(sidecar):
    held = [Stream(sidecar.target) for _ in range(4)]
    try:
        for i, stream in enumerate(held):
            expect_ack(stream, batch(1, [seq(f"held-{i}")]))
        extra = Stream(sidecar.target)
        error = extra.ended(timeout=30)
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 streams open (limits.max_streams)" in error.details()
        extra.close()
        # The held streams send nothing more: each is closed after the idle timeout (3 s).
        started = time.monotonic()
        for stream in held:
            error = stream.ended(timeout=30)
            assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream idle: the client sent no batch for 3 s" in error.details()
        assert time.monotonic() - started < 15
        deadline = time.monotonic() + 10
        while sidecar.metric("safety_monitor_active_streams") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sidecar.metric("safety_monitor_active_streams") == 0
        assert sidecar.metric("safety_monitor_batches_rejected_total", reason="stream_idle") >= 4
        again = Stream(sidecar.target)  # room again
        expect_ack(again, batch(1, [seq("after")]))
        again.close()
    finally:
        for stream in held:
            stream.close()


# --------------------------------------------------------------------------- protocol


def _raw_channel_call(target: str, method: str, payloads: list[bytes], streaming: bool):
    channel = grpc.insecure_channel(target)
    identity = lambda data: data  # noqa: E731 - bytes as they are, however malformed
    path = f"/safety_monitor.v1.SafetyMonitor/{method}"
    try:
        if streaming:
            call = channel.stream_stream(path, identity, identity)
            return list(call(iter(payloads), metadata=auth("alice"), timeout=30))
        call = channel.unary_unary(path, identity, identity)
        return call(payloads[0], metadata=auth("alice"), timeout=30)
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("method", "streaming"), [("Monitor", True), ("Evaluate", False), ("GetStatus", False)]
)
def test_undecodable_messages_are_invalid_argument(sidecar, method, streaming):
    good = batch(1, [seq("decodable")]).SerializeToString()
    payloads = [good, b"\x0a\xff\xff\xff\xff\x0f"] if streaming else [b"\x0a\xff\xff\xff\xff"]
    with pytest.raises(grpc.RpcError) as caught:
        _raw_channel_call(sidecar.target, method, payloads, streaming)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "protobuf decoding failed" in details
    for leak in ("Error", "Exception", "Traceback", "<class"):
        assert leak not in details


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(sidecar, scheme):
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        metadata = [("authorization", f"{scheme} {TOKENS['mallory']}")]
        status = stub.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=30)
        assert status.rules == 1
        limits = status.limits  # what a client learns before sending
        assert (limits.max_sequences_per_batch, limits.max_streams) == (64, 4)
        assert (limits.max_request_id_length, limits.stream_idle_timeout_seconds) == (16, 3)
        assert limits.max_stream_bytes == 64 * 1024 * 1024
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStatus(
                pb.StatusRequest(), metadata=[("authorization", f"{scheme} nope")], timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------------- the ack bound


ABUSIVE_ROWS = 16384  # limits.max_rows_per_batch, the largest batch a client may send
ABUSIVE_STREAMS = 4  # 2 abusing threads, each with at most 2 streams open at once
CROWD = 200_000  # empty sequences in one message (the attack had 1.5 million)


def abuse(target: str, token: str, seconds: float, started: Any) -> None:
    """Runs in its own process: two threads open stream after stream and push maximal
    batches, messages of 200,000 empty sequences and garbage, never reading an event."""
    heavy = batch(0, [seq("heavy", rows=ABUSIVE_ROWS)]).SerializeToString()
    crowd = batch(0, [seq(f"e{i}", rows=0) for i in range(CROWD)]).SerializeToString()
    garbage = b"\x0a\xff\xff\xff\xff\x0f"
    deadline = time.monotonic() + seconds
    metadata = [("authorization", f"Bearer {token}")]

    def one_thread(k: int) -> None:
        rounds = 0
        while time.monotonic() < deadline and rounds < 10_000:
            rounds += 1
            payloads = [heavy if i % 2 else crowd for i in range(16)]
            if rounds % 3 == 0:
                payloads.append(garbage)
            channel = grpc.insecure_channel(target)
            call = channel.stream_stream(
                "/safety_monitor.v1.SafetyMonitor/Monitor", lambda b: b, lambda b: b
            )(iter(payloads), metadata=metadata)
            started.set()
            time.sleep(0.5)  # never reads its events, then goes away
            call.cancel()
            channel.close()

    threads = [threading.Thread(target=one_thread, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_an_abusive_client_cannot_delay_another_clients_acks_beyond_the_bound(workdir, tmp_path):
    """The documented bound: a batch waits for at most one processing job of each other
    open stream (at most 8 batches, each within the per-batch limits) before its own, and
    no message parses on the event loop for longer than one of 1 MiB does. Here an abusive
    client in its own process keeps up to 4 streams busy with maximal batches, messages
    of 200,000 empty sequences and garbage, while a well-behaved client sends one-token
    decode steps. Its worst send-to-ack must stay within (1 + 4 streams x 8) maximal
    batches, timed in the same run, doubled for the abuser's share of the 2 cores, plus
    0.5 s of scheduling slack. Before the limits, each 200,000-sequence message held the
    processing thread for seconds."""
    process = start_sidecar(
        {
            "packs": [str(workdir / "bars.pack.safetensors")],
            "rules": [str(workdir / "rules.yaml")],
            "security": {"token_files": {n: str(workdir / f"{n}.token") for n in TOKENS}},
        },
        tmp_path,
    )
    big = batch(0, [seq("big", rows=ABUSIVE_ROWS)])
    abuser = None
    try:
        probe = Stream(process.target, "mallory")
        times = []
        for i in range(5):  # what one maximal batch costs on this machine, right now
            big.seq_no = i
            big.sequences[0].position = i * ABUSIVE_ROWS
            started = time.monotonic()
            expect_ack(probe, big)
            times.append(time.monotonic() - started)
        probe.close()
        one_batch = sorted(times)[len(times) // 2]
        bound = 2 * (1 + ABUSIVE_STREAMS * 8) * one_batch + 0.5

        context = multiprocessing.get_context("spawn")
        started = context.Event()
        abuser = context.Process(
            target=abuse, args=(process.target, TOKENS["mallory"], 90.0, started)
        )
        abuser.start()
        assert started.wait(60), "the abusive client did not start"
        time.sleep(2.0)  # the abuse runs at full speed
        victim = Stream(process.target, "alice")
        delays = []
        try:
            for position in range(40):
                started = time.monotonic()
                expect_ack(victim, batch(position, [seq("victim", position=position)]))
                delays.append(time.monotonic() - started)
        finally:
            victim.close()
        assert abuser.is_alive()  # the abuse was still going on while we measured
        assert process.process.poll() is None
        rejected = process.metric(
            "safety_monitor_batches_rejected_total", reason="too_many_sequences"
        )
        assert rejected > 0
        print(
            f"victim send-to-ack max {max(delays):.3f} s, bound {bound:.3f} s, "
            f"one maximal batch {one_batch:.4f} s"
        )
        assert max(delays) <= bound, (max(delays), bound, one_batch)
    finally:
        if abuser is not None:
            abuser.terminate()
            abuser.join(10)
        process.stop()
