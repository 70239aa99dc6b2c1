"""Defaults shared by several parts, defined once so they cannot drift apart."""

# Conversations whose state is kept at once: by the rule engine (rolling windows, cooldowns),
# by the audit recorder (token windows) and by the sidecar's `limits.max_conversations`.
# Past it the least recently seen conversation is evicted (counted in the metrics).
MAX_CONVERSATIONS = 100_000

# Slots of one stream's conversation table (the columnar sequence format), at most: the
# sidecar's `limits.max_conversation_slots` may not be set above it, and a capture client
# uses no more than it whatever slot count a sidecar reports (both sides hold a table of
# that many entries per stream). A batched server runs a few hundred sequences at once.
MAX_CONVERSATION_SLOTS = 65_536

# The longest relay linger a capture client accepts (milliseconds): alerts come later by up to
# the linger, and a monitor whose alerts lag by seconds is no monitor.
MAX_LINGER_MS = 1000.0
