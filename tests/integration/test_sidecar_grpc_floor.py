"""scripts/sidecar_grpc_floor.py: its bare servers ack every step of the bench's paced
phase, by the seq_no each step carries, so their CPU per step is comparable with the
sidecar's."""

from __future__ import annotations

import itertools

import pytest

from monitor.bench import sidecar as bench
from monitor.fixtures import free_port
from monitor.wire.columns import COLUMNS
from tests.conftest import load_script


@pytest.fixture(scope="module")
def floor():  # type: ignore[no-untyped-def]
    yield from load_script("sidecar_grpc_floor")


def test_the_leading_seq_no_is_the_steps_seq_no(floor) -> None:  # type: ignore[no-untyped-def]
    steps = itertools.islice(bench._decode_steps(4, COLUMNS), 300)
    for step in itertools.chain(steps, [bench._prefill(2**40 + 3, 2, 0)]):
        assert floor._leading_seq_no(step.SerializeToString()) == step.seq_no
    assert floor._leading_seq_no(b"") == 0


def test_the_bare_servers_run_with_serves_server_options(floor) -> None:  # type: ignore[no-untyped-def]
    """Like for like: the flow-control options (no bandwidth probe, a 4 MiB window) and
    message sizes of the sidecar the floor is compared with."""
    from monitor.sidecar.config import Limits
    from monitor.sidecar.process import server_options

    options = dict(floor._options())
    assert options == dict(server_options(Limits().max_message_bytes))
    assert options["grpc.http2.bdp_probe"] == 0


@pytest.mark.parametrize("parse", [False, True])
def test_a_bare_server_acks_every_step(floor, parse) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    process = floor._start_bare(port, parse)
    try:
        stream = bench._Stream(f"127.0.0.1:{port}", window=8)
        stream.run(itertools.islice(bench._decode_steps(64, COLUMNS), 40))
    finally:
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(30) == 0  # it stops when its stdin closes
    assert len(stream.latencies) == 40 and not stream.sent and stream.errors == 0
    assert stream.rows == 40 * 64
