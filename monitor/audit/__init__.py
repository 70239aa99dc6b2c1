"""Audit trail of flagged conversations: redaction, storage backends, recorder and review CLI.

Free of gRPC and torch: the sidecar hands the recorder plain values (or tensors, read through
`tolist()`), and the CLI reads the store without loading any model code.
"""

from monitor.audit.recorder import (
    AuditCounts,
    AuditFiring,
    AuditRecorder,
    AuditSlice,
    AuditStep,
    AuditWriteResult,
    RecorderConfig,
)
from monitor.audit.redaction import Redactor
from monitor.audit.store import AuditQuery, AuditStore, StoreError, open_store

__all__ = [
    "AuditCounts",
    "AuditFiring",
    "AuditQuery",
    "AuditRecorder",
    "AuditSlice",
    "AuditStep",
    "AuditStore",
    "AuditWriteResult",
    "RecorderConfig",
    "Redactor",
    "StoreError",
    "open_store",
]
