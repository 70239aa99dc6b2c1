"""Which conversations have rule state, in which slot, and whose turn it is to lose one.

The engine keeps state for at most ``max_conversations`` conversations. When a new one
arrives at the cap, one must go. Plain least-recently-used eviction lets one client that
floods new conversation ids push out every other client's conversations (a ``for: 8`` rule
of theirs then never fires). Here every conversation has an *owner*, the client that last
sent it (the sidecar passes the authenticated identity, or the connection), and eviction is
fair between owners:

- an owner holding at least its fair share (the cap divided by the number of owners) evicts
  its own least recently used conversation;
- otherwise the owner holding the most loses its least recently used one.

So a client holding less than its fair share is never evicted by others, however fast they
send new ids, unless one wave of theirs alone holds more conversations than their share: the
wave's conversations cannot be evicted, so the rest comes from the largest other owners.
Within one owner the order is least recently used, as before.

A conversation is keyed by its id, or by ``(scope, id)`` when the sidecar scopes
conversation state (by client identity or a tenant attribute): the same id sent by two
clients is then two conversations, and one cannot end or reset the other's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass


@dataclass
class Conversation:
    """One tracked conversation: its state slot, the next position expected, its request and
    the owner it is charged to."""

    slot: int
    next_position: int
    request_id: str = ""
    owner: str = ""


class ConversationTable:
    """Conversation keys -> slots, with per-owner LRU order and fair eviction at the cap."""

    def __init__(self, max_conversations: int) -> None:
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        self.max = max_conversations
        self._all: dict[Hashable, Conversation] = {}
        self._owners: dict[str, OrderedDict[Hashable, None]] = {}
        # Changes with every touch, add and pop: the engine recognises a decode step that
        # binds the same conversations as the previous one with nothing changed in between.
        self.version = 0

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._all

    def get(self, key: Hashable) -> Conversation | None:
        return self._all.get(key)

    def owners(self) -> dict[str, int]:
        """Conversations held per owner (for tests and metrics)."""
        return {owner: len(keys) for owner, keys in self._owners.items()}

    def touch(self, key: Hashable, owner: str) -> None:
        """Mark a tracked conversation as just used by `owner` (it is charged to them now)."""
        conv = self._all[key]
        self.version += 1
        if conv.owner == owner:
            self._owners[owner].move_to_end(key)
            return
        self._forget_owner(key, conv.owner)
        conv.owner = owner
        self._owners.setdefault(owner, OrderedDict())[key] = None

    def add(self, key: Hashable, conv: Conversation) -> None:
        """Track a new conversation (the caller made room first with `victim`)."""
        self._all[key] = conv
        self.version += 1
        self._owners.setdefault(conv.owner, OrderedDict())[key] = None

    def pop(self, key: Hashable) -> Conversation | None:
        """Stop tracking a conversation; its Conversation (and slot) is returned."""
        conv = self._all.pop(key, None)
        if conv is not None:
            self.version += 1
            self._forget_owner(key, conv.owner)
        return conv

    def victim(self, owner: str, keep: Collection[Hashable]) -> Hashable | None:
        """The conversation to evict so `owner` can add one, or None while under the cap.
        Conversations in `keep` (the ones being evaluated right now) are never chosen."""
        if len(self._all) < self.max:
            return None
        mine = self._owners.get(owner)
        owners = len(self._owners) + (0 if mine else 1)
        if mine and len(mine) * owners >= self.max:  # at or over its fair share
            key = next(iter(mine))
            if key not in keep:
                return key
        for _, keys in sorted(self._owners.items(), key=lambda item: -len(item[1])):
            key = next(iter(keys))
            if key not in keep:
                return key
        return None  # everything tracked is in use right now (the caller checked sizes)

    def _forget_owner(self, key: Hashable, owner: str) -> None:
        keys = self._owners[owner]
        del keys[key]
        if not keys:
            del self._owners[owner]
