"""What crosses from the forward pass to the ring: one CapturedStep per forward."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tagging:
    """Who each batch row belongs to: fixed for every forward of one `conversation(...)` block
    at one batch size, so it is built once and shared by those steps."""

    conversation_ids: tuple[str, ...]
    roles: tuple[str, ...]
    request_ids: tuple[str, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)
    end: bool = False  # an end-of-conversation message (zero rows)
    # Equal keys mean an equal tagging: the frame writer reuses the serialised metadata.
    # None: build it afresh every time.
    key: Hashable | None = None
    # Per sequence: its slice's last row ends a turn of its role (`Sequence.turn_end`). Empty
    # when no sequence does. Part of the tagging, not of the step: it is serialised into the
    # frame template with the rest, so a step of an unmarked block costs nothing more.
    turn_ends: tuple[bool, ...] = ()


@dataclass
class CapturedStep:
    """One forward pass, as host copies (or, on a CPU, the layer outputs themselves: the step
    is copied onto the ring before the forward continues).

    layers: hook point -> [batch, seq, d_model] activations (or, with local encoding,
    features: (pack, sha, hook point) -> [batch * seq, k] values, already row-selected).
    rows, positions: per sequence of the tagging, the real tokens this step covers and the
    conversation position of the first of them.
    valid: [batch, seq] bool, the rows to send (padding and already-sent tokens are False);
    None means every row.
    """

    layers: dict[str, torch.Tensor]
    tagging: Tagging
    rows: list[int]
    positions: list[int]
    valid: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None  # [batch, seq] on CPU, for token text
    features: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # set when a device->host copy is asynchronous
    # The layers are views of buffers that outlive the step (vLLM's capture buffers): a later
    # step naming the same view objects reads the same memory, so the frame writer may reuse
    # this step's frame layout for it (decode steps repeat one layout).
    persistent_layers: bool = False

    @property
    def total_rows(self) -> int:
        """Token rows in the step, all sequences together."""
        return sum(self.rows)


@dataclass
class CaptureStats:
    """Counters of one capture client; read them any time, they only grow."""

    steps_captured: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    batches_rejected: int = 0
    rows_acked: int = 0
    reconnects: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    # StepBatch messages the relay sent; the batches_* counters count steps, which a relay
    # with a linger sends several to a message.
    messages_sent: int = 0
