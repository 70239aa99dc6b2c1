"""Defaults shared by several parts, defined once so they cannot drift apart."""

# Conversations whose state is kept at once: by the rule engine (rolling windows, cooldowns),
# by the audit recorder (token windows) and by the sidecar's `limits.max_conversations`.
# Past it the least recently seen conversation is evicted (counted in the metrics).
MAX_CONVERSATIONS = 100_000
