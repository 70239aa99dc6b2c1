"""How the relay waits for frames (relay/sender.py, channel/ring.py): it blocks on an eventfd
that the producer writes only while the relay has said it is waiting; it follows a steady pace
without being woken; a wake-up lost to store/load reordering costs one bounded sleep, never a
frame. Real rings, eventfds and threads; the assertions count wake-ups, never time."""

from __future__ import annotations

import os
import random
import resource
import threading

import pytest
import torch

from monitor.capture.channel.frames import FrameWriter
from monitor.capture.channel.protocol import RelayConfig, SenderSettings
from monitor.capture.channel.ring import SharedRing, Slot
from monitor.capture.relay import sender as sender_module
from monitor.capture.relay.sender import FrameSource
from monitor.capture.steps import CapturedStep, Tagging

TAGGING = Tagging(("c",), ("assistant",), ("r",), key=("wake",))


class Pair:
    """A ring with its wake-up eventfd, the producer's writer and the relay's source."""

    def __init__(self, pace: bool = False, capacity: int = 1 << 20) -> None:
        self.ring = SharedRing.create(capacity)
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.writer = FrameWriter(self.ring, wakeup_fd=self.wakeup)
        self.source = FrameSource(self.ring, wakeup_fd=self.wakeup, pace=pace)
        self.buffer = torch.zeros(1, 8)

    def publish(self, position: int) -> None:
        self.buffer.fill_(float(position))
        step = CapturedStep({"layers.0": self.buffer}, TAGGING, [1], [position])
        assert self.writer.write(step, None)

    def close(self) -> None:
        self.source.close()
        self.ring.close()
        os.close(self.wakeup)


@pytest.fixture
def pair():
    made = Pair()
    yield made
    made.close()


def wait_until_waiting(ring: SharedRing, source: FrameSource) -> None:
    """Until the relay thread has set WAITING and gone to sleep (bounded by a count)."""
    for _ in range(200_000):
        if ring.slots[Slot.WAITING] and source.waits:
            return
        threading.Event().wait(0.0001)
    raise AssertionError("the relay never went to sleep")


def in_thread(source: FrameSource, timeout: float) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(source.next(timeout, lambda: None)))
    thread.start()
    return thread, got


def test_a_sleeping_relay_is_woken_by_the_next_frame(pair):
    """The relay blocks (WAITING set); the publish sees WAITING and writes the eventfd once.
    Without that write the relay would sleep for its whole 60 s and the join would fail."""
    thread, got = in_thread(pair.source, 60)
    wait_until_waiting(pair.ring, pair.source)
    pair.publish(7)
    thread.join(30)
    assert not thread.is_alive(), "the frame did not wake the relay"
    assert got[0].sequences[0].position == 7
    assert pair.writer.wakeups_sent == 1
    assert pair.ring.slots[Slot.WAITING] == 0  # busy again: the next publish writes nothing
    pair.publish(8)
    assert pair.writer.wakeups_sent == 1
    assert pair.source.next(1, lambda: None).sequences[0].position == 8


def test_a_lost_wake_up_costs_one_bounded_sleep_not_the_frame(pair, monkeypatch):
    """The race the fences close: the producer publishes as the relay sets WAITING, and each
    misses the other (the relay's look at HEAD is stale, the producer saw WAITING clear). The
    relay's first sleep is bounded (LOST_WAKEUP_BOUND), so it finds the frame when that sleep
    times out instead of sleeping for the caller's whole 60 s."""
    real_peek = pair.source._peek
    raced = []

    def fence_then_race(lock):
        # Between the relay's store of WAITING and its look at the ring: a publish that does
        # not see WAITING (as if the loads and stores crossed), and a look that misses it.
        pair.ring.slots[Slot.WAITING] = 0
        pair.publish(3)
        pair.ring.slots[Slot.WAITING] = 1
        pair.source._peek = lambda: None
        raced.append(1)

    def peek_again():
        return real_peek()

    monkeypatch.setattr(sender_module, "full_fence", fence_then_race)
    original_wait = pair.source._wait

    def wait(now, remaining):
        interrupted = original_wait(now, remaining)
        pair.source._peek = peek_again  # only the one look misses
        return interrupted

    pair.source._wait = wait
    batch = pair.source.next(60, lambda: None)
    assert raced == [1]
    assert batch is not None and batch.sequences[0].position == 3
    assert pair.writer.wakeups_sent == 0  # lost, as in the race
    assert pair.source.timeouts == 1  # found after one bounded sleep
    assert pair.source.waits == 1


def test_frames_arrive_in_order_from_a_racing_producer():
    """A producer publishing in bursts and pauses while the relay keeps going to sleep: every
    frame arrives, in order, and no `next` ever waits out its 30 s (it would return None)."""
    pair = Pair(pace=True, capacity=1 << 16)  # small: the frames wrap the ring many times
    count = 3000
    rng = random.Random(12)
    pauses = [rng.choice((0.0, 0.0, 0.0001, 0.0005, 0.002)) for _ in range(count)]

    def produce():
        for position, pause in enumerate(pauses):
            while True:
                try:
                    pair.publish(position)
                    break
                except AssertionError:  # full: the relay is behind
                    threading.Event().wait(0.0005)
            if pause:
                threading.Event().wait(pause)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        seen = []
        while len(seen) < count:
            batch = pair.source.next(30, lambda: None)
            assert batch is not None, f"frame {len(seen)} waited 30 s"
            seen.append(batch.sequences[0].position)
        assert seen == list(range(count))
    finally:
        producer.join(60)
        pair.close()


def test_an_idle_relay_sleeps_instead_of_polling(pair):
    """A second with nothing to read: at most two sleeps (the bounded first one, then the rest),
    no polling (the old relay woke 200 times a second); and it clears WAITING on its way out,
    so a publish while it is elsewhere costs the producer no system call."""
    assert pair.source.next(1.0, lambda: None) is None
    assert pair.source.waits <= 3
    assert pair.source.polls == 0
    assert pair.ring.slots[Slot.WAITING] == 0
    pair.publish(1)
    assert pair.writer.wakeups_sent == 0


def test_interrupt_wakes_a_sleeping_relay(pair):
    """Stopping or a broken stream must not wait for the relay's sleep to end."""
    thread, got = in_thread(pair.source, 60)
    wait_until_waiting(pair.ring, pair.source)
    pair.source.interrupt()
    thread.join(30)
    assert not thread.is_alive()
    assert got == [None]
    assert pair.ring.slots[Slot.WAITING] == 0


def test_the_schedule_follows_the_steps_pace(pair):
    """Frames every 8 ms: block until a little before the next is due, poll around it, and
    block again (until woken) when it is overdue or the model has paused; no pace without
    pacing or before two frames."""
    source = pair.source
    source.pace = True
    assert source.schedule(0.0) == float("inf")  # nothing seen yet
    for at in (0.0, 0.008, 0.016):
        source._taken(at)
    assert source.gap == pytest.approx(0.008)
    ahead = sender_module.POLL_AHEAD_FRACTION * 0.008 + sender_module.POLL_AHEAD
    assert source.schedule(0.017) == pytest.approx(0.024 - ahead - 0.017)
    assert source.schedule(0.024 - ahead / 2) is None  # due: poll, WAITING clear
    assert source.schedule(0.0315) is None  # late, within one more gap
    assert source.schedule(0.033) == float("inf")  # overdue: wait to be woken
    assert source.schedule(0.016 + sender_module.ACTIVE_FOR + 0.01) == float("inf")  # paused
    source._taken(0.019)  # a faster pace is learnt within a few steps
    assert source.gap == pytest.approx(0.0055)
    source.pace = False
    assert source.schedule(0.0205) == float("inf")


def test_polling_while_a_frame_is_due_leaves_waiting_clear(pair):
    """The point of pacing: while the relay polls, the producer finds WAITING clear and makes
    no system call."""
    source = pair.source
    source.pace = True
    pair.publish(0)
    pair.publish(1)
    assert source.next(1, lambda: None) is not None
    assert source.next(1, lambda: None) is not None
    source.gap, source._last_frame = 0.1, sender_module.time.monotonic() - 0.095
    pair.ring.slots[Slot.WAITING] = 1  # as left by an earlier sleep
    assert source._wait(sender_module.time.monotonic(), 0.001) is False
    assert source.polls == 1
    assert pair.ring.slots[Slot.WAITING] == 0
    pair.publish(2)
    assert pair.writer.wakeups_sent == 0


def test_the_wakeup_fd_travels_in_the_relay_settings():
    settings = SenderSettings("127.0.0.1:1", "m", 1 << 20, (0.1, 1.0), 1.0, False)
    config = RelayConfig(settings, ring_fd=5, ring_capacity=4096, wakeup_fd=9)
    assert RelayConfig.from_json(config.to_json()).wakeup_fd == 9
    # A line from a client without the field (an older serving process) still parses.
    line = config.to_json().replace(b', "wakeup_fd": 9', b"")
    assert b"wakeup_fd" not in line
    assert RelayConfig.from_json(line).wakeup_fd is None


HIGH_FD = 1500  # over select()'s FD_SETSIZE (1024): what pass_fds hands a busy serving process's


@pytest.fixture
def high_fds():
    """Room for fd numbers over FD_SETSIZE: the soft RLIMIT_NOFILE raised for this test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HIGH_FD + 64
    assert hard == resource.RLIM_INFINITY or hard >= wanted, f"hard fd limit {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_wakeup_fd_numbered_over_fd_setsize_still_wakes_the_relay(high_fds):
    """The eventfd arrives with the serving process's number; over 1024 select() raised
    ValueError on every wait, and the relay's stream was cancelled and reopened forever.
    The relay works on a low copy of it (and closes that copy)."""
    pair = Pair()
    os.dup2(pair.wakeup, HIGH_FD)
    pair.writer = FrameWriter(pair.ring, wakeup_fd=HIGH_FD)
    pair.source.close()
    pair.source = FrameSource(pair.ring, wakeup_fd=HIGH_FD)
    try:
        assert pair.source.next(0.01, lambda: None) is None  # an empty ring: a plain timeout
        thread, got = in_thread(pair.source, 60)
        wait_until_waiting(pair.ring, pair.source)
        pair.publish(3)
        thread.join(30)
        assert not thread.is_alive(), "the frame did not wake the relay"
        assert got[0].sequences[0].position == 3
        assert pair.writer.wakeups_sent == 1
        copy = pair.source.wakeup_fd
        assert copy is not None and copy < 1024  # waited on with select() again
        pair.source.close()
        with pytest.raises(OSError):  # the copy is the source's to close
            os.fstat(copy)
        pair.source = FrameSource(pair.ring)  # for pair.close()
    finally:
        pair.close()
        os.close(HIGH_FD)


def test_with_no_low_fd_free_the_relay_waits_with_poll(high_fds):
    """Where every number under FD_SETSIZE is taken, the high fds are waited on as they
    are (poll(), no number limit): a frame still wakes the relay, `interrupt` still works."""
    pair = Pair()
    os.dup2(pair.wakeup, HIGH_FD)
    pair.writer = FrameWriter(pair.ring, wakeup_fd=HIGH_FD)
    pair.source.close()
    filler: list[int] = []
    try:
        while True:  # take every free number under 1024 (bounded: at most 1024 of them)
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if fd >= 1024:
                os.close(fd)
                break
            filler.append(fd)
            assert len(filler) <= 1024
        pair.source = FrameSource(pair.ring, wakeup_fd=HIGH_FD)
        assert pair.source.wakeup_fd == HIGH_FD  # no low copy was possible
        assert pair.source._interrupt >= 1024  # its own eventfd is over the limit too
        for fd in filler:
            os.close(fd)
        filler.clear()
        assert pair.source.next(0.01, lambda: None) is None
        thread, got = in_thread(pair.source, 60)
        wait_until_waiting(pair.ring, pair.source)
        pair.publish(4)
        thread.join(30)
        assert not thread.is_alive(), "the frame did not wake the relay"
        assert got[0].sequences[0].position == 4
        thread, got = in_thread(pair.source, 60)
        wait_until_waiting(pair.ring, pair.source)
        pair.source.interrupt()
        thread.join(30)
        assert not thread.is_alive() and got == [None]
    finally:
        for fd in filler:
            os.close(fd)
        pair.close()
        os.close(HIGH_FD)
