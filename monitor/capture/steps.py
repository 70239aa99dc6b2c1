"""What crosses from the forward pass to the sender thread: one CapturedStep per forward."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SequenceTag:
    """Who one batch row belongs to, and which of its token positions this step covers."""

    conversation_id: str
    rows: int
    position: int
    role: str
    request_id: str
    end: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class CapturedStep:
    """One forward pass, as host copies; row selection and serialisation happen later, off the
    model's thread.

    layers: hook point -> [batch, seq, d_model] activations (or, with local encoding,
    features: (pack, sha, hook point) -> [batch * seq, k] values, already row-selected).
    valid: [batch, seq] bool, the rows to send (padding and already-sent tokens are False);
    None means every row.
    """

    layers: dict[str, torch.Tensor]
    sequences: list[SequenceTag]
    valid: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None  # [batch, seq] on CPU, for token text
    features: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None  # set when a device->host copy is asynchronous
    # Same key, same conversation ids, roles, request ids and attributes in the same order:
    # lets the frame writer reuse the step's metadata and only update rows and positions.
    tags_key: tuple[int, int] | None = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sequences)


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
