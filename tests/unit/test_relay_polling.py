"""The relay's pace on an empty ring: while steps flow at a steady pace it sleeps through most
of the gap between frames instead of waking every 0.5 ms (each wake-up costs CPU that, on a
machine the relay shares with the engine, is the engine's)."""

from __future__ import annotations

import pytest

from monitor.capture.channel.ring import SharedRing
from monitor.capture.relay.sender import FrameSource, poll_delay


def test_no_known_pace_polls_every_half_millisecond():
    assert poll_delay(0.0, None) == pytest.approx(0.0005)
    assert poll_delay(0.004, None) == pytest.approx(0.0005)


def test_a_steady_pace_sleeps_through_most_of_the_gap():
    # Frames 10 ms apart, one just taken: first look 7.5 ms later (three quarters of the
    # gap), then every 0.5 ms until the frame is there.
    assert poll_delay(0.0, 0.010) == pytest.approx(0.0075)
    assert poll_delay(0.005, 0.010) == pytest.approx(0.0025)
    assert poll_delay(0.0075, 0.010) == pytest.approx(0.0005)
    assert poll_delay(0.012, 0.010) == pytest.approx(0.0005)
    # Frames 2 ms apart: a first look after 1.5 ms, not four looks.
    assert poll_delay(0.0, 0.002) == pytest.approx(0.0015)
    # Frames 100 ms apart: never more than 50 ms without a look.
    assert poll_delay(0.0, 0.100) == pytest.approx(0.05)


def test_a_quiet_ring_polls_slowly():
    assert poll_delay(0.3, 0.010) == pytest.approx(0.005)
    assert poll_delay(0.3, None) == pytest.approx(0.005)


def test_the_pace_follows_frames_of_an_active_stream_only():
    ring = SharedRing.create(1 << 16)
    try:
        source = FrameSource(ring)
        source._note_frame(100.0)  # the first frame after a long quiet time: no gap yet
        assert source.gap is None
        source._note_frame(100.010)
        assert source.gap == pytest.approx(0.010)
        source._note_frame(100.030)  # a slower step moves the average a fifth of the way
        assert source.gap == pytest.approx(0.012)
        source._note_frame(105.0)  # a pause between requests is not a gap between steps
        assert source.gap == pytest.approx(0.012)
    finally:
        ring.close()
