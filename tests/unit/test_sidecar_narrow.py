"""The sidecar encodes only the columns the rules read: what the rules engine sees, the firings
and the events must be those of encoding every pack's full block and picking the columns."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from monitor.features import FeaturePack, RestrictedEncoder, TopKExactEncoder
from monitor.features.pack import FeatureInfo, HookPointEncoder
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules import FeatureBlock
from monitor.sidecar import pipeline as pipeline_module
from monitor.sidecar.config import Limits
from monitor.sidecar.pipeline import Pipeline
from monitor.sidecar.process import load_ruleset
from monitor.wire import encode_tensor, pb

D_MODEL, HOOKS = 32, ("layers.1", "layers.2")


def _restricted(gen: torch.Generator, k: int, normalization: str) -> RestrictedEncoder:
    floor = torch.rand(k, generator=gen) * 0.5
    floor[::5] = -torch.inf  # identity columns
    return RestrictedEncoder(
        torch.randn(D_MODEL, k, generator=gen) / 4,
        torch.randn(k, generator=gen) / 4,
        floor,
        normalization,
    )


def _entry(hook_point: str, encoder, prefix: str) -> HookPointEncoder:
    floors = encoder.column_floors()
    features = [
        FeatureInfo(
            f"{prefix}{i}",
            hook_point,
            "topk"
            if isinstance(encoder, TopKExactEncoder)
            else ("identity" if floor == -float("inf") else "jumprelu"),
            i,
        )
        for i, floor in enumerate(floors)
    ]
    return HookPointEncoder(hook_point, encoder, features)


@pytest.fixture(scope="module")
def packs() -> list[FeaturePack]:
    """Three packs, two hook points: sliced encoders of 48, 40 and 64 columns (one with the
    layer-norm prologue) and an exact TopK encoder (never narrowed)."""
    gen = torch.Generator().manual_seed(7)
    topk = TopKExactEncoder(
        torch.randn(D_MODEL, 96, generator=gen),
        torch.randn(96, generator=gen) / 4,
        torch.arange(0, 96, 3),
        top_k=12,
        relu_first=False,
        normalization="none",
    )
    a = FeaturePack(
        "a",
        {
            "layers.1": _entry("layers.1", _restricted(gen, 48, "none"), "x"),
            "layers.2": _entry("layers.2", _restricted(gen, 40, "layer_norm"), "y"),
        },
    )
    b = FeaturePack("b", {"layers.1": _entry("layers.1", topk, "t")})
    c = FeaturePack(
        "c", {"layers.2": _entry("layers.2", _restricted(gen, 64, "constant_norm_rescale"), "z")}
    )
    return [a, b, c]


def _ruleset(packs: list[FeaturePack], tmp_path, seed: int, name: str):
    """Rules on a random handful of every pack's columns, thresholds near the medians so they
    hold about half the time, some temporal."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lines, rules = ["features:"], ["rules:"]
    for pack in packs:
        for hook_point in pack.hook_points:
            sample = pack.encode(hook_point, torch.randn(500, D_MODEL, generator=gen))
            names = pack.qualified_names(hook_point)
            for column in sorted(rng.sample(range(len(names)), rng.randint(1, 6))):
                alias = f"f{len(lines)}"
                lines.append(f"  {alias}: {names[column]}")
                median = float(sample[:, column].median())
                kind = rng.randrange(3)
                if kind == 0:
                    condition, extra = f"{alias} > {median!r}", ""
                elif kind == 1:
                    condition, extra = (
                        f"rolling_mean({alias}, 3) > {median!r}",
                        ", cooldown: 2 tokens",
                    )
                else:
                    condition, extra = f"{alias} > {median!r}", ", for: 2 tokens"
                rules.append(
                    f"  - {{rule: r{len(rules)}, severity: info, condition: '{condition}'{extra}}}"
                )
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines + rules) + "\n")
    return load_ruleset([path], packs)


def _pipelines(packs, ruleset, monkeypatch) -> tuple[Pipeline, Pipeline]:
    """A narrowing pipeline, and one that encodes every full block (no sub-encoder is ever
    narrower than a huge multiple)."""
    narrowed = Pipeline(packs, ruleset, SidecarMetrics(), Limits())
    monkeypatch.setattr(pipeline_module, "NARROW_MULTIPLE", 1 << 30)
    full = Pipeline(packs, ruleset, SidecarMetrics(), Limits())
    monkeypatch.undo()
    return narrowed, full


def _replace_rules(pipelines, ruleset, monkeypatch) -> None:
    narrowed, full = pipelines
    narrowed.replace_rules(ruleset)
    monkeypatch.setattr(pipeline_module, "NARROW_MULTIPLE", 1 << 30)
    full.replace_rules(ruleset)
    monkeypatch.undo()


def _stream(packs, seed: int, steps: int = 40) -> list[pb.StepBatch]:
    """Prefills and decode steps of a few conversations at both hook points; now and then a
    batch carries pack `a`'s blocks encoded by the client (full width)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    position = dict.fromkeys((f"c{i}" for i in range(4)), 0)
    batches = []
    for seq_no in range(1, steps + 1):
        batch = pb.StepBatch(seq_no=seq_no, model="m")
        rows = 0
        for cid in rng.sample(sorted(position), rng.randint(1, 4)):
            n = 1 if rng.random() < 0.7 else rng.randint(2, 9)
            batch.sequences.append(
                pb.Sequence(conversation_id=cid, rows=n, position=position[cid], role="assistant")
            )
            position[cid] += n
            rows += n
        for hook_point in HOOKS:
            values = torch.randn(rows, D_MODEL, generator=gen)
            batch.layers.append(pb.Layer(hook_point=hook_point, activations=encode_tensor(values)))
            if rng.random() < 0.3:
                block = packs[0].encode(hook_point, values)
                batch.features.append(
                    pb.FeatureBlock(
                        pack="a",
                        pack_sha256=packs[0].sha256,
                        hook_point=hook_point,
                        values=encode_tensor(block),
                    )
                )
        batches.append(batch)
    return batches


def _tolerance(values: np.ndarray) -> float:
    """What two summation orders of a D_MODEL-term dot product may differ by (2 gamma_d of the
    sum of absolute terms, bounded here by the values' scale plus a margin of 8)."""
    scale = 8.0 * (1.0 + float(np.abs(np.asarray(values)).max(initial=0.0)))
    return 2 * D_MODEL * float(np.finfo(np.float32).eps) * scale


def _same_features(narrowed, full) -> None:
    assert list(narrowed) == list(full)  # same names, same order
    for name in full:
        a, b = np.asarray(narrowed[name]), np.asarray(full[name])
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=0, atol=_tolerance(b), err_msg=name)


def _events(outcome) -> list[bytes]:
    return [event.SerializeToString(deterministic=True) for event in outcome.events]


@pytest.mark.parametrize("seed", range(3))
def test_narrowed_encode_gives_the_engine_what_the_full_blocks_give(
    packs, tmp_path, monkeypatch, seed
):
    first = _ruleset(packs, tmp_path, 100 + seed, "first")
    second = _ruleset(packs, tmp_path, 200 + seed, "second")
    pipelines = _pipelines(packs, first, monkeypatch)
    narrowed, full = pipelines
    # Narrowed: the sliced blocks whose read columns (padded) are fewer than the block's
    # width; never the exact TopK one.
    kinds = {p.key: p.encoder for p in narrowed._plans}
    assert kinds[("b", "layers.1")] is None
    assert any(encoder is not None for encoder in kinds.values())
    assert all(p.encoder is None for p in full._plans)

    seen: list[tuple[dict, dict]] = []
    for engine_of in (narrowed, full):
        evaluate = engine_of.engine.evaluate

        def spy(features, *args, _evaluate=evaluate, _into=engine_of, **kwargs):
            _into.seen_features.append(dict(features))
            return _evaluate(features, *args, **kwargs)

        engine_of.seen_features = []
        engine_of.engine.evaluate = spy

    batches = _stream(packs, seed)
    fired = 0
    for step, batch in enumerate(batches):
        if step == len(batches) // 2:  # a reload that changes the columns read
            _replace_rules(pipelines, second, monkeypatch)
            assert [p.index for p in narrowed._plans] != [p.index for p in full._plans]
        got, want = narrowed.process(batch), full.process(batch)
        assert _events(got) == _events(want)
        assert [f.rule for f in got.firings] == [f.rule for f in want.firings]
        fired += len(want.firings)
    seen = list(zip(narrowed.seen_features, full.seen_features, strict=True))
    assert len(seen) == len(batches)
    for got_features, want_features in seen:
        _same_features(got_features, want_features)
    assert fired > 20  # the comparison means something


def test_client_encoded_and_sidecar_encoded_blocks_use_their_own_columns(
    packs, tmp_path, monkeypatch
):
    """One block, read narrowed: a client-encoded block (full width) is read with the pack's
    columns, an activation block with the narrowed encoder's; the same values either way."""
    rules = tmp_path / "one.yaml"
    rules.write_text(
        "features: {p: a/x3, q: a/x17, r: a/x40}\n"
        "rules:\n"
        "  - {rule: one, severity: info, condition: 'p > 0.1 or q > 0.1 or r > 0.1'}\n"
    )
    ruleset = load_ruleset([rules], packs)
    narrowed, full = _pipelines(packs, ruleset, monkeypatch)
    (plan,) = narrowed._plans
    assert plan.encoder is not None and plan.encoder.k == 16  # 3 read, padded to 16 of 48
    assert plan.index == {"a/x3": 0, "a/x17": 1, "a/x40": 2}
    assert plan.full_index == {"a/x3": 3, "a/x17": 17, "a/x40": 40}
    values = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(1))
    batch = pb.StepBatch(seq_no=1, model="m")
    batch.sequences.append(pb.Sequence(conversation_id="c", rows=5, role="assistant"))
    batch.layers.append(pb.Layer(hook_point="layers.1", activations=encode_tensor(values)))
    here = narrowed.encode(narrowed.validate(batch))
    reference = full.encode(full.validate(batch))
    batch.features.append(
        pb.FeatureBlock(
            pack="a",
            hook_point="layers.1",
            values=encode_tensor(packs[0].encode("layers.1", values)),
        )
    )
    client = narrowed.encode(narrowed.validate(batch))
    assert isinstance(here, FeatureBlock) and here.block.shape == (5, 16)
    assert isinstance(client, FeatureBlock) and client.block.shape == (5, 48)
    _same_features(here, reference)
    for name in reference:
        assert np.array_equal(client[name], reference[name])  # the client's values, as sent


def test_evaluate_with_features_returns_every_full_column(packs, tmp_path, monkeypatch):
    ruleset = _ruleset(packs, tmp_path, 5, "evaluate")
    narrowed, full = _pipelines(packs, ruleset, monkeypatch)
    (batch,) = _stream(packs, 9, steps=1)
    del batch.features[:]
    got = narrowed.evaluate_once(batch, include_features=True)
    want = full.evaluate_once(batch, include_features=True)
    assert _events(got) == _events(want)
    expected = sum(p.feature_count for p in packs)
    assert len(got.features) == len(want.features) == expected
    assert sorted(got.features) == sorted(want.features)
    for name, values in want.features.items():
        np.testing.assert_allclose(
            np.asarray(got.features[name]), np.asarray(values), rtol=0, atol=_tolerance(values)
        )


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64, 512])
def test_narrowed_columns_are_bit_identical_at_the_reference_width(rows):
    """At a block width that is a multiple of 16 (the bench's 256), the narrowed encoder's
    columns are bit-identical to the full block's (``NARROW_MULTIPLE``: checked on this
    machine's BLAS; a failure here means the comment and README claim must change)."""
    gen = torch.Generator().manual_seed(rows)
    encoder = RestrictedEncoder(
        torch.randn(512, 256, generator=gen),
        torch.randn(256, generator=gen),
        torch.zeros(256),
        "none",
    )
    x = torch.randn(rows, 512, generator=gen)
    full = encoder.encode(x)
    for count in (1, 5, 12, 20, 33):
        columns = sorted(random.Random(count).sample(range(256), count))
        sub = encoder.subset(columns, pipeline_module.NARROW_MULTIPLE)
        assert sub.k == -(-count // 16) * 16
        out = sub.encode(x)
        assert torch.equal(out[:, :count], full[:, columns]), count
        assert not out[:, count:].any()  # the padding columns are 0


def test_bench_reference_rules_read_their_columns_or_all(tmp_path):
    """`bench sidecar`'s reference rules: 20 columns of 256 (the sidecar encodes 32, padded),
    or with `--rules-read all` every column (the full encode, the bound's shape); 20 rules,
    10 temporal, either way."""
    from monitor.bench.sidecar import FEATURES, reference_setup

    for mode, read, width in (("rules", 20, 32), ("all", FEATURES, FEATURES)):
        pack, ruleset = reference_setup(tmp_path / mode, mode)
        assert len(ruleset.rules) == 20
        assert len(ruleset.required_features) == read
        pipeline = Pipeline([pack], ruleset, SidecarMetrics(), Limits())
        (hook_point,) = pack.hook_points
        assert pipeline.encoded_width(pack, hook_point) == width


def test_small_batches_encode_on_one_thread_with_the_same_events(packs, tmp_path, monkeypatch):
    """Batches of at most `single_thread_rows` rows encode on one torch thread of the calling
    thread, larger ones on the count torch had when the pipeline was made; the events are
    those of a pipeline that never switches (0: always torch's count). After each encode the
    count is the pipeline's again, and a thread started later begins with it: the one-thread
    setting does not leak (torch's set_num_threads also sets the value new threads take)."""
    import threading

    ruleset = _ruleset(packs, tmp_path, 11, "threads")
    batches = _stream(packs, 11)
    rows = [sum(sequence.rows for sequence in batch.sequences) for batch in batches]
    assert min(rows) <= 4 < max(rows)  # both sides of the bound below are taken
    seen: dict[str, object] = {}
    inside: list[int] = []
    real = pipeline_module.encode_threads

    @contextlib.contextmanager
    def recording(threads: int, restore: int):
        with real(threads, restore):
            inside.append(torch.get_num_threads())
            yield

    monkeypatch.setattr(pipeline_module, "encode_threads", recording)

    def run() -> None:  # a thread of its own: torch's thread count is per calling thread
        # set_num_threads also sets what threads started later begin with: put back what
        # this fresh thread started with, so later tests keep the suite's count.
        start = torch.get_num_threads()
        try:
            _run()
        finally:
            torch.set_num_threads(start)

    def _run() -> None:
        torch.set_num_threads(2)
        switching = Pipeline(packs, ruleset, SidecarMetrics(), Limits(), single_thread_rows=4)
        never = Pipeline(packs, ruleset, SidecarMetrics(), Limits(), single_thread_rows=0)
        assert switching.threads == never.threads == 2
        threads, events, after, later = [], [], [], []
        for batch, count in zip(batches, rows, strict=True):
            inside.clear()
            got = switching.process(batch)
            threads.append((count, list(inside)))
            after.append(torch.get_num_threads())
            if count <= 4 and not later:
                # The last set was a one-thread encode's: a thread started now must not
                # begin with it.
                probe = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
                probe.start()
                probe.join(30)
            want = never.process(batch)
            assert torch.get_num_threads() == 2
            events.append((_events(got), _events(want)))
        seen.update(threads=threads, events=events, after=after, later=later)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(120)
    assert not worker.is_alive() and seen, "the encode thread failed or hung"
    for count, threads in seen["threads"]:
        assert threads and set(threads) == {1 if count <= 4 else 2}, count
    assert set(seen["after"]) == {2}
    assert seen["later"] == [2]
    fired = 0
    for got, want in seen["events"]:
        assert got == want
        fired += len(got) - 1
    assert fired > 0  # alerts were compared, not only acks


def test_the_parse_thread_converts_on_one_torch_thread(packs, tmp_path):
    """The parse thread converts prefill-sized layers while the worker encodes on the
    pipeline's threads: it runs on one torch thread, whatever count another thread set last
    (here the pipeline's 2)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from monitor.sidecar.service import SafetyMonitorService

    ruleset = _ruleset(packs, tmp_path, 12, "parse")
    seen: list[int] = []

    def run() -> None:
        start = torch.get_num_threads()  # what later threads start with; put back below
        torch.set_num_threads(2)
        pipeline = Pipeline(packs, ruleset, SidecarMetrics(), Limits())
        with ThreadPoolExecutor(max_workers=1) as worker:
            service = SafetyMonitorService(pipeline, worker, SidecarMetrics())
            try:
                seen.append(service.parser.submit(torch.get_num_threads).result(30))
            finally:
                service.parser.shutdown(wait=True)
                torch.set_num_threads(start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert seen == [1]
