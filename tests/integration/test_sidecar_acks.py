"""Coalesced acks (event format "acks") and the light-load inline path, against a real
sidecar: both directions of wire compatibility (a client that does not ask gets one Ack per
batch; the capture relay asks only a sidecar that offers it), the same acks and alerts
either way, every alert before the event that acks its batch, and exact token accounting
through the capture relay when its steps are grouped."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest
import torch

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama
from monitor.sidecar import service as service_module
from monitor.sidecar import streams
from monitor.sidecar.config import parse_config
from monitor.sidecar.process import SidecarThread
from monitor.sidecar.service import SafetyMonitorService
from monitor.wire import encode_tensor, pb, pb_grpc
from monitor.wire.acks import ACKS, acked, ask_for_acks
from tests.integration.test_capture_serving import (
    HIDDEN,
    generate,
    seen_tokens,
    sidecar_config,
    tokens,
    wait_connected,
)


class Recorded:
    """A sidecar in this process, with what its pipeline and servicer did recorded."""

    def __init__(self, tmp_path, monkeypatch, slow: float = 0.0) -> None:
        raw = {**sidecar_config(tmp_path), "metrics_port": 0}
        self.thread = SidecarThread(parse_config(raw, tmp_path, "test"))
        self.groups: list[int] = []  # batches per process_many call
        self.threads: list[str] = []  # the thread each call ran on
        self.asked: list[bool] = []  # per stream: did the client ask for "acks"
        self.coalesced = 0  # Acks events the servicer made
        pipeline = self.thread.sidecar.pipeline
        process_many = pipeline.process_many

        def recorded(batches, *args, **kwargs):
            self.groups.append(len(batches))
            self.threads.append(threading.current_thread().name)
            if slow:  # steps queue up meanwhile, so the next ones are grouped
                time.sleep(slow)
            return process_many(batches, *args, **kwargs)

        pipeline.process_many = recorded  # type: ignore[method-assign]
        asks, coalesce = service_module.asks_for_acks, service_module.coalesce_acks

        def recorded_asks(metadata):
            self.asked.append(asks(metadata))
            return self.asked[-1]

        def recorded_coalesce(events):
            merged = coalesce(events)
            self.coalesced += sum(event.HasField("acks") for event in merged)
            return merged

        monkeypatch.setattr(service_module, "asks_for_acks", recorded_asks)
        monkeypatch.setattr(service_module, "coalesce_acks", recorded_coalesce)
        self.port = self.thread.start().port
        self.target = f"127.0.0.1:{self.port}"

    def hold_worker(self, until) -> asyncio.Future:
        """Keep the pipeline thread busy (a job queued through the servicer's worker) until
        `until()` is true, at most 30 s: the stream's batches then wait and are grouped."""
        started = threading.Event()

        def hold() -> None:
            started.set()
            deadline = time.monotonic() + 30
            while not until() and time.monotonic() < deadline:
                time.sleep(0.005)

        service = self.thread.sidecar.service
        assert service is not None
        future = asyncio.run_coroutine_threadsafe(
            service.worker.run(hold),
            self.thread._loop,  # the test reaches into its own sidecar
        )
        assert started.wait(30)
        return future

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def sidecars(tmp_path, monkeypatch):
    """Recorded sidecars, made on demand and stopped at the end."""
    made: list[Recorded] = []

    def make(slow: float = 0.0) -> Recorded:
        made.append(Recorded(tmp_path / f"sidecar-{len(made)}", monkeypatch, slow))
        return made[-1]

    yield make
    for sidecar in made:
        sidecar.stop()


@pytest.fixture
def parsed(monkeypatch):
    """Messages the sidecar has parsed so far (a list that grows)."""
    seen: list[int] = []
    parse = service_module._parse

    def counting(data):
        result = parse(data)
        seen.append(len(data))
        return result

    monkeypatch.setattr(service_module, "_parse", counting)
    return seen


def _decode_steps(count: int, conversations: int = 2) -> list[pb.StepBatch]:
    steps = []
    generator = torch.Generator().manual_seed(0)
    for step in range(count):
        batch = pb.StepBatch(seq_no=step + 1, model="tiny")
        values = torch.randn(conversations, HIDDEN, generator=generator)
        batch.layers.append(pb.Layer(hook_point="layers.1", activations=encode_tensor(values)))
        for c in range(conversations):
            batch.sequences.append(pb.Sequence(conversation_id=f"c{c}", rows=1, position=step))
        steps.append(batch)
    return steps


def _grouped_stream(sidecar: Recorded, parsed: list[int], metadata=()) -> list[pb.MonitorEvent]:
    """Nine decode steps on one stream while the pipeline thread is held until all of them
    have arrived: the first is processed alone, the other eight as one group."""
    steps = _decode_steps(9)
    held = sidecar.hold_worker(lambda: len(parsed) >= len(steps))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        events = list(stub.Monitor(iter(steps), metadata=metadata, timeout=60))
    held.result(30)
    assert max(sidecar.groups) > 1, sidecar.groups  # the steps were grouped
    return events


def _acks(events: list[pb.MonitorEvent]) -> list[tuple[int, int, int]]:
    return [(a.seq_no, a.rows, a.alerts) for event in events for a in acked(event)]


def _prefill(seq_no: int, rows: int, conversation: str) -> pb.StepBatch:
    batch = pb.StepBatch(seq_no=seq_no, model="tiny")
    values = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seq_no))
    batch.layers.append(pb.Layer(hook_point="layers.1", activations=encode_tensor(values)))
    batch.sequences.append(pb.Sequence(conversation_id=conversation, rows=rows, position=0))
    return batch


def test_waiting_batches_group_only_up_to_group_rows(sidecars, parsed):
    """Batches that wait while the pipeline thread is busy are taken as one group only up
    to `streams.GROUP_ROWS` rows: prefill-sized batches go one by one (each one's ack as it
    is done, no merge copying their activations), small steps still group, and a group
    that reaches the rows with a large batch stops there. Every batch is acked, in order."""
    sidecar = sidecars()
    big = streams.GROUP_ROWS
    messages = [
        _prefill(1, big, "p0"),  # handed to the pipeline thread behind the holding job
        *(_prefill(seq_no, big, f"p{seq_no}") for seq_no in range(2, 5)),  # wait: one by one
        *(_prefill(seq_no, 2, f"s{seq_no}") for seq_no in range(5, 8)),  # wait: one group...
        _prefill(8, big, "p8"),  # ...that this one joins and fills
        _prefill(9, 2, "s9"),  # the next group
    ]
    held = sidecar.hold_worker(lambda: len(parsed) >= len(messages))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        events = list(stub.Monitor(iter(messages), timeout=60))
    held.result(30)
    assert sidecar.groups == [1, 1, 1, 1, 4, 1]
    rows = [m.layers[0].activations.shape[0] for m in messages]
    assert [(seq_no, n) for seq_no, n, _ in _acks(events)] == list(
        zip(range(1, 10), rows, strict=True)
    )
    assert not [e for e in events if e.HasField("error")]


def test_large_bf16_layers_reach_the_pipeline_as_float32_with_the_same_events(sidecars):
    """A message over `streams.PARSE_INLINE_BYTES` is parsed on the parse thread, which on a
    CPU sidecar also converts its BF16 layer to float32 (the copy every CPU encoder makes
    first), so the worker thread does not: the pipeline gets float32 activations, and the
    events are exactly those of a sidecar that hands on the BF16 layer."""
    rows = streams.PARSE_INLINE_BYTES // (2 * HIDDEN) + 8  # BF16: just over the bound
    values = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(3))
    batch = pb.StepBatch(seq_no=1, model="tiny")
    batch.layers.append(
        pb.Layer(hook_point="layers.1", activations=encode_tensor(values.bfloat16()))
    )
    batch.sequences.append(pb.Sequence(conversation_id="long", rows=rows, position=0))
    runs = []
    for widen in (True, False):
        sidecar = sidecars()
        service = sidecar.thread.sidecar.service
        assert service.widen  # a CPU sidecar
        service.widen = widen
        dtypes: list[torch.dtype] = []
        process_many = sidecar.thread.sidecar.pipeline.process_many

        def seen(batches, *args, process_many=process_many, dtypes=dtypes, **kwargs):
            dtypes.extend(t.dtype for layers in kwargs["decoded"] for t in layers)
            return process_many(batches, *args, **kwargs)

        sidecar.thread.sidecar.pipeline.process_many = seen  # type: ignore[method-assign]
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.SafetyMonitorStub(channel)
            runs.append(list(stub.Monitor(iter([batch]), timeout=60)))
        assert dtypes == [torch.float32 if widen else torch.bfloat16]
    widened, kept = runs
    assert _acks(widened) == _acks(kept) == [(1, rows, _acks(kept)[0][2])]
    assert [e.SerializeToString() for e in widened] == [e.SerializeToString() for e in kept]


def test_get_status_offers_the_acks_format(sidecars):
    sidecar = sidecars()
    with grpc.insecure_channel(sidecar.target) as channel:
        status = pb_grpc.SafetyMonitorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
    assert list(status.event_formats) == [ACKS]


def test_a_client_that_does_not_ask_gets_one_ack_per_batch_and_one_that_asks_the_same_acks(
    sidecars, parsed
):
    """An old client (no metadata) on a new sidecar: only Ack events, one per batch, even
    for grouped steps. A new client asking for "acks" on a fresh sidecar, the same steps:
    fewer events, the same acks in the same order, the same alerts in the same order, and
    each alert before the event that acks its batch."""
    old = sidecars()
    per_batch = _grouped_stream(old, parsed)
    assert old.asked == [False] and old.coalesced == 0
    kinds = {event.WhichOneof("event") for event in per_batch}
    assert kinds == {"ack", "alert"}
    assert [e.ack.seq_no for e in per_batch if e.HasField("ack")] == list(range(1, 10))

    parsed.clear()
    new = sidecars()
    merged = _grouped_stream(new, parsed, ask_for_acks())
    assert new.asked == [True] and new.coalesced >= 1
    assert any(event.HasField("acks") for event in merged)
    assert len(merged) < len(per_batch)
    assert _acks(merged) == _acks(per_batch)
    alerts = [e.alert for e in merged if e.HasField("alert")]
    assert alerts == [e.alert for e in per_batch if e.HasField("alert")]
    assert alerts  # the counting rules fire on every token
    acked_at = {ack[0]: i for i, event in enumerate(merged) for ack in _acks([event])}
    for i, event in enumerate(merged):
        if event.HasField("alert"):
            assert i < acked_at[event.alert.seq_no]


def _two_conversations(target: str) -> CaptureClient:
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(target, model_name="tiny", metrics_registry=None)
    client.attach(model, layers=[1])
    wait_connected(client)
    with client.conversation(["first", "second"]):
        generate(model, input_ids=tokens([5, 6, 7, 8], [1, 2, 3, 4]), max_new_tokens=24)
    assert client.flush(60)
    return client


def test_the_relay_asks_for_acks_and_counts_every_grouped_step(sidecars):
    """The capture relay against a sidecar that offers "acks" and processes slowly (its
    steps queue and are grouped): it asks, gets Acks events, and every step is acked and
    every token seen exactly once."""
    sidecar = sidecars(slow=0.1)
    client = _two_conversations(sidecar.target)
    try:
        assert sidecar.asked == [True]
        assert max(sidecar.groups) > 1 and sidecar.coalesced >= 1
        assert seen_tokens(client, "first") == seen_tokens(client, "second") == 4 + 24 - 1
        stats = client.stats
        assert stats.batches_rejected == 0 and sum(stats.dropped.values()) == 0
        assert stats.batches_acked == stats.batches_sent == sum(sidecar.groups)
        assert stats.rows_acked == 2 * (4 + 24 - 1)
    finally:
        client.close(timeout=10)


@pytest.fixture
def older_status(monkeypatch):
    """GetStatus as a sidecar older than the "acks" format answers it: no event_formats."""
    status = SafetyMonitorService.GetStatus

    async def old_status(self, request, context):
        response = await status(self, request, context)
        response.ClearField("event_formats")
        return response

    monkeypatch.setattr(SafetyMonitorService, "GetStatus", old_status)


def test_the_relay_does_not_ask_a_sidecar_that_does_not_offer_acks(older_status, sidecars):
    sidecar = sidecars(slow=0.1)
    client = _two_conversations(sidecar.target)
    try:
        assert sidecar.asked == [False]
        assert max(sidecar.groups) > 1 and sidecar.coalesced == 0
        assert seen_tokens(client, "first") == seen_tokens(client, "second") == 4 + 24 - 1
        assert client.stats.batches_acked == client.stats.batches_sent == sum(sidecar.groups)
        assert client.stats.rows_acked == 2 * (4 + 24 - 1)
    finally:
        client.close(timeout=10)


def test_small_batches_run_on_the_event_loop_only_while_the_worker_is_idle(sidecars):
    """A small step with nothing on the pipeline thread is processed on the event loop
    (the hand-off would cost as much as the work); one of more rows, or a small one while
    the pipeline thread is busy, goes to the pipeline thread."""
    sidecar = sidecars()
    # No inline budget here: a step slowed by a busy machine must not change the path.
    sidecar.thread.sidecar.service.inline = streams.InlineBudget(budget=math.inf)
    small = _decode_steps(1)[0]
    big = pb.StepBatch(seq_no=2, model="tiny")
    rows = streams.INLINE_ROWS + 1  # over the inline rows (a few KB: bytes are not the bound)
    big.layers.append(
        pb.Layer(hook_point="layers.1", activations=encode_tensor(torch.randn(rows, HIDDEN)))
    )
    big.sequences.append(pb.Sequence(conversation_id="big", rows=rows, position=0))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        events = list(stub.Monitor(iter([small, big]), timeout=60))
        assert [(seq_no, rows) for seq_no, rows, _ in _acks(events)] == [(1, 2), (2, rows)]
        assert sidecar.threads[0] == "sidecar"  # the SidecarThread's event loop
        assert sidecar.threads[1].startswith("pipeline")

        # Held until the next step has been handed to the pipeline thread too.
        worker = sidecar.thread.sidecar.service.worker
        handed = worker.submitted + 2  # the holding job and the step
        held = sidecar.hold_worker(lambda: worker.submitted >= handed)
        later = _decode_steps(2)[1]
        assert _acks(list(stub.Monitor(iter([later]), timeout=60)))[-1][0] == 2
        held.result(30)
    assert sidecar.threads[2].startswith("pipeline")


def test_an_inline_run_over_the_budget_sends_the_next_small_steps_to_the_pipeline_thread(
    sidecars,
):
    """The inline bound is on work, not bytes: a run that took longer than the budget (here
    zero: any run) turns the inline path off, so the next small step, on an idle pipeline
    thread, goes there."""
    sidecar = sidecars()
    service = sidecar.thread.sidecar.service
    service.inline = streams.InlineBudget(budget=0.0, pause=600.0)
    first, second = _decode_steps(2)
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        assert _acks(list(stub.Monitor(iter([first]), timeout=60)))[-1][0] == 1
        assert service.inline.pauses == 1
        assert service.worker.idle
        assert _acks(list(stub.Monitor(iter([second]), timeout=60)))[-1][0] == 2
    assert sidecar.threads[0] == "sidecar"  # inline, then over the budget
    assert sidecar.threads[1].startswith("pipeline")


def test_a_client_encoded_step_over_the_rows_bound_goes_to_the_pipeline_thread(sidecars):
    """A batch of client-encoded features (encode_locally: no layers) is bounded by the rows
    it carries like any other: a small one runs on the event loop, one over `INLINE_ROWS`
    rows goes to the pipeline thread (its bytes alone would have let it run inline)."""
    sidecar = sidecars()
    sidecar.thread.sidecar.service.inline = streams.InlineBudget(budget=math.inf)
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        pack = stub.GetStatus(pb.StatusRequest(), timeout=10).packs[0]
        (hook_point,) = pack.hook_points

        def encoded(seq_no: int, conversation: str, rows: int) -> pb.StepBatch:
            batch = pb.StepBatch(seq_no=seq_no, model="tiny")
            batch.features.append(
                pb.FeatureBlock(
                    pack=pack.name,
                    pack_sha256=pack.sha256,
                    hook_point=hook_point,
                    values=encode_tensor(torch.zeros(rows, pack.features)),
                )
            )
            batch.sequences.append(pb.Sequence(conversation_id=conversation, rows=rows))
            return batch

        rows = streams.INLINE_ROWS + 1
        big = encoded(2, "big", rows)
        assert big.ByteSize() <= streams.INLINE_FEATURE_BYTES  # bytes are not what stops it
        events = list(stub.Monitor(iter([encoded(1, "small", 2), big]), timeout=60))
    assert [(seq_no, rows) for seq_no, rows, _ in _acks(events)] == [(1, 2), (2, rows)]
    assert sidecar.threads[0] == "sidecar"  # the SidecarThread's event loop
    assert sidecar.threads[1].startswith("pipeline")
