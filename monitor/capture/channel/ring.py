"""A single-producer, single-consumer ring of frames in shared memory: how captured steps
cross from the serving process to its relay process without a system call, a pickle or a
wake-up per step.

The memory is an anonymous memfd: it has no name to leak, and it is gone once both
processes have closed it (a `kill -9` of either included). Layout:

    [header: 4096 bytes of little-endian u64 slots][data: `capacity` bytes]

`head` (bytes published) is written only by the producer and `tail` (bytes consumed) only by
the consumer; both only grow, and a frame lives at `offset % capacity`. Frames never straddle
the end of the data area: a frame that would is preceded by a PAD frame filling the rest.
Every slot is an aligned 8-byte store, which the CPU performs atomically. The producer
writes a frame's bytes before it advances `head`, and the consumer copies a frame out before
it advances `tail`. x86-64 keeps stores in order, so there the consumer never sees `head`
pass a half-written frame. Elsewhere (AArch64) Python has no fence to offer, so the producer
also writes one byte to a doorbell pipe per frame and the consumer trusts only the frames it
has a doorbell for: the two system calls order the memory, at the price of a syscall per step.

Waking the relay: on x86-64 the relay does not poll. When it finds the ring empty it sets
`WAITING`, looks at the ring once more, and blocks on an eventfd; the producer, after each
publish, writes that eventfd only if `WAITING` is set. While the relay keeps up with a busy
model it is rarely waiting and the model's thread makes no system call; at light load it costs
one `eventfd_write` per step (a few microseconds), and an idle relay sleeps. The doorbell pipe
of other CPUs is already a wake-up: there the relay blocks on it instead.

The remaining slots are counters the relay keeps for the serving process (acks, drops,
connection state), so reading its statistics costs the serving process nothing either.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from enum import IntEnum
from typing import NamedTuple

HEADER_BYTES = 4096
ALIGN = 64  # frames start on cache lines
FRAME_HEADER = struct.Struct("<IIII")  # frame bytes, kind, meta bytes, rows


class Slot(IntEnum):
    """The u64 slots of the header. Producer: HEAD, PUBLISHED, HURRY; the rest (WAITING
    included): the relay."""

    HEAD = 0
    TAIL = 1
    PUBLISHED = 2  # frames published
    CONSUMED = 3  # frames taken off the ring by the relay
    CONNECTED = 4  # 1 while a stream to the sidecar is open
    SENT = 5
    ACKED = 6
    REJECTED = 7
    ROWS_ACKED = 8
    RECONNECTS = 9
    LOST_DISCONNECTED = 10  # in flight when the stream broke
    LOST_UNAVAILABLE = 11  # taken off the ring while the sidecar was unreachable (fail-open)
    LOST_BAD_FRAME = 12  # a frame the relay could not turn into a message
    RELAY_READY = 13  # the relay has started and read its configuration
    UNREACHABLE = 14  # 1 from a failed connection attempt until the next stream opens
    ALERTS = 15  # alerts written to the relay's stdout (before their batch's ack is counted)
    WAITING = 16  # 1 while the relay is (about to be) blocked on its wake-up eventfd
    # Producer: > 0 while the serving process waits for verdicts (`RelayLink.hurry`): the
    # relay then sends every step at once, whatever its linger.
    HURRY = 17
    MESSAGES = 18  # StepBatch messages sent (SENT counts steps: fewer messages with a linger)
    # Local encoding in the relay (relay/encode.py): 0 loading or not asked, 1 the pack is
    # loaded and encodes, 2 it could not be used (activations go unencoded).
    ENCODER = 19


# The hot slots as plain ints: indexing with an IntEnum member costs a class attribute lookup
# (about 0.2 us each, several per step on the model's thread and in the relay's loop).
_HEAD, _TAIL = int(Slot.HEAD), int(Slot.TAIL)
_PUBLISHED, _CONSUMED = int(Slot.PUBLISHED), int(Slot.CONSUMED)
SLOT_WAITING = int(Slot.WAITING)
SLOT_HURRY = int(Slot.HURRY)

# Every way a consumed frame is settled, and the drop reason the client reports for it.
LOST_REASONS = {
    Slot.LOST_DISCONNECTED: "disconnected",
    Slot.LOST_UNAVAILABLE: "sidecar_unavailable",
    Slot.LOST_BAD_FRAME: "serialise_error",
}


class FrameKind(IntEnum):
    """What a frame on the ring holds: padding up to the end of the buffer, a step, or a step that
    reuses the cached metadata of an earlier one.
    """

    PAD = 0
    STEP = 1  # metadata: a StepBatch
    TEMPLATED_STEP = 2  # metadata: a cached StepBatch of the same tagging + rows and positions


class Frame(NamedTuple):
    """A frame as the reader finds it: kind, where it starts in `data`, its size and metadata
    size."""

    kind: FrameKind
    offset: int  # in `data`
    size: int  # bytes, header and padding included
    meta: int  # metadata bytes
    rows: int


def full_fence(lock: threading.Lock) -> None:
    """A full memory fence, as far as Python can give one: taking and releasing an uncontended
    lock runs atomic read-modify-write instructions (on x86-64, `lock`-prefixed ones, which
    no load or store crosses), in user space, without a system call. `lock` is the caller's
    own, never shared with another thread, so it is always free."""
    lock.acquire()
    lock.release()


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to the frame alignment."""
    return (nbytes + ALIGN - 1) & ~(ALIGN - 1)


class SharedRing:
    """The ring over one memfd. `create` on the producer side, `attach` on the consumer."""

    def __init__(self, fd: int, capacity: int) -> None:
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"ring capacity must be a positive multiple of {ALIGN}")
        self.fd = fd
        self.capacity = capacity
        # Populated up front: a first touch of a shared-memory page costs a fault, and in the
        # serving process it would land on the model's thread, a few faults every step until
        # the ring had wrapped once. The memory is the ring's size from the start, and flat.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(fd, HEADER_BYTES + capacity, flags=flags)
        self.slots = memoryview(self._map)[:HEADER_BYTES].cast("Q")
        self.data = memoryview(self._map)[HEADER_BYTES:]
        # Where `data` lies in this process, for copies straight from a tensor's memory
        # (ctypes.memmove: no array object built per copy). Valid until `close`.
        anchor = ctypes.c_char.from_buffer(self._map, HEADER_BYTES)
        self.data_address = ctypes.addressof(anchor)
        del anchor  # the mapping must not stay exported, or it could never be closed

    @classmethod
    def create(cls, capacity: int) -> SharedRing:
        """A new ring in an anonymous memory file (the serving process's side)."""
        fd = os.memfd_create("safety-monitor-capture")  # close-on-exec: only the relay gets it
        os.ftruncate(fd, HEADER_BYTES + capacity)
        return cls(fd, capacity)

    @classmethod
    def attach(cls, fd: int, capacity: int) -> SharedRing:
        """The ring behind an inherited file descriptor (the relay's side); ValueError on a size
        mismatch."""
        if os.fstat(fd).st_size != HEADER_BYTES + capacity:
            raise ValueError(f"shared ring fd {fd} is not {HEADER_BYTES + capacity} bytes")
        return cls(fd, capacity)

    def close(self) -> None:
        """Unmap the ring and close its file descriptor."""
        self.slots.release()
        self.data.release()
        self._map.close()
        os.close(self.fd)

    # ---- producer --------------------------------------------------------------------------

    def frames_waiting(self) -> int:
        """Frames published and not yet consumed."""
        return self.slots[_PUBLISHED] - self.slots[_CONSUMED]

    def reserve(self, nbytes: int) -> tuple[int, int] | None:
        """Room for a frame of `nbytes` (aligned): (offset in `data`, new head), or None when
        the consumer has not freed enough yet. Nothing is visible until `publish`."""
        if nbytes > self.capacity:
            return None
        head, tail = self.slots[_HEAD], self.slots[_TAIL]
        position = head % self.capacity
        pad = self.capacity - position if position + nbytes > self.capacity else 0
        if head + pad + nbytes - tail > self.capacity:
            return None
        if pad:
            FRAME_HEADER.pack_into(self.data, position, pad, FrameKind.PAD, 0, 0)
        return (0 if pad else position), head + pad + nbytes

    def publish(self, new_head: int) -> None:
        """Make the frame reserved up to `new_head` visible to the reader."""
        self.slots[_PUBLISHED] += 1
        self.slots[_HEAD] = new_head

    # ---- consumer --------------------------------------------------------------------------

    def peek(self) -> Frame | None:
        """The next frame: (kind, offset, frame bytes, meta bytes, rows), skipping padding;
        None when the ring is empty. Call `release` once the frame has been copied out."""
        while True:
            tail = self.slots[_TAIL]
            if tail >= self.slots[_HEAD]:
                return None
            offset = tail % self.capacity
            size, kind, meta, rows = FRAME_HEADER.unpack_from(self.data, offset)
            if kind == FrameKind.PAD:
                self.slots[_TAIL] = tail + size
                continue
            return Frame(FrameKind(kind), offset, size, meta, rows)

    def release(self, size: int) -> None:
        """Give the oldest frame's `size` bytes back to the writer."""
        self.slots[_CONSUMED] += 1
        self.slots[_TAIL] = self.slots[_TAIL] + size
