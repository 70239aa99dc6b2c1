import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("hook_point", "activations")
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    hook_point: str
    activations: Tensor
    def __init__(self, hook_point: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("conversation_id", "request_id", "rows", "position", "tokens", "role", "end", "attributes", "turn_end")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TURN_END_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    request_id: str
    rows: int
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[str]
    role: str
    end: bool
    attributes: _containers.ScalarMap[str, str]
    turn_end: bool
    def __init__(self, conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., rows: _Optional[int] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[str]] = ..., role: _Optional[str] = ..., end: _Optional[bool] = ..., attributes: _Optional[_Mapping[str, str]] = ..., turn_end: _Optional[bool] = ...) -> None: ...

class FeatureBlock(_message.Message):
    __slots__ = ("pack", "pack_sha256", "hook_point", "values")
    PACK_FIELD_NUMBER: _ClassVar[int]
    PACK_SHA256_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    pack: str
    pack_sha256: str
    hook_point: str
    values: Tensor
    def __init__(self, pack: _Optional[str] = ..., pack_sha256: _Optional[str] = ..., hook_point: _Optional[str] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("seq_no", "model", "layers", "sequences", "sent_at", "features", "columns")
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    seq_no: int
    model: str
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    sent_at: _timestamp_pb2.Timestamp
    features: _containers.RepeatedCompositeFieldContainer[FeatureBlock]
    columns: SequenceColumns
    def __init__(self, seq_no: _Optional[int] = ..., model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., features: _Optional[_Iterable[_Union[FeatureBlock, _Mapping]]] = ..., columns: _Optional[_Union[SequenceColumns, _Mapping]] = ...) -> None: ...

class ConversationSlot(_message.Message):
    __slots__ = ("slot", "conversation_id", "request_id", "role", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    slot: int
    conversation_id: str
    request_id: str
    role: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, slot: _Optional[int] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., role: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SequenceColumns(_message.Message):
    __slots__ = ("define", "slot", "rows", "position", "end", "tokens", "turn_end")
    DEFINE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TURN_END_FIELD_NUMBER: _ClassVar[int]
    define: _containers.RepeatedCompositeFieldContainer[ConversationSlot]
    slot: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    position: _containers.RepeatedScalarFieldContainer[int]
    end: _containers.RepeatedScalarFieldContainer[bool]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    turn_end: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, define: _Optional[_Iterable[_Union[ConversationSlot, _Mapping]]] = ..., slot: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[int]] = ..., position: _Optional[_Iterable[int]] = ..., end: _Optional[_Iterable[bool]] = ..., tokens: _Optional[_Iterable[str]] = ..., turn_end: _Optional[_Iterable[bool]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq_no", "rows", "alerts")
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    seq_no: int
    rows: int
    alerts: int
    def __init__(self, seq_no: _Optional[int] = ..., rows: _Optional[int] = ..., alerts: _Optional[int] = ...) -> None: ...

class Acks(_message.Message):
    __slots__ = ("seq_no", "rows", "alerts")
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    seq_no: _containers.RepeatedScalarFieldContainer[int]
    rows: _containers.RepeatedScalarFieldContainer[int]
    alerts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_no: _Optional[_Iterable[int]] = ..., rows: _Optional[_Iterable[int]] = ..., alerts: _Optional[_Iterable[int]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("seq_no", "rule", "category", "severity", "conversation_id", "request_id", "position", "value", "message", "labels", "actions")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    seq_no: int
    rule: str
    category: str
    severity: str
    conversation_id: str
    request_id: str
    position: int
    value: float
    message: str
    labels: _containers.ScalarMap[str, str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq_no: _Optional[int] = ..., rule: _Optional[str] = ..., category: _Optional[str] = ..., severity: _Optional[str] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., position: _Optional[int] = ..., value: _Optional[float] = ..., message: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., actions: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("seq_no", "reason", "field", "message")
    SEQ_NO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq_no: int
    reason: str
    field: str
    message: str
    def __init__(self, seq_no: _Optional[int] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MonitorEvent(_message.Message):
    __slots__ = ("ack", "alert", "error", "acks")
    ACK_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    alert: Alert
    error: BatchError
    acks: Acks
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ..., acks: _Optional[_Union[Acks, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("batch", "include_features")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    batch: StepBatch
    include_features: bool
    def __init__(self, batch: _Optional[_Union[StepBatch, _Mapping]] = ..., include_features: _Optional[bool] = ...) -> None: ...

class FeatureValues(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("alerts", "error", "features")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    error: BatchError
    features: _containers.RepeatedCompositeFieldContainer[FeatureValues]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ..., features: _Optional[_Iterable[_Union[FeatureValues, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PackStatus(_message.Message):
    __slots__ = ("name", "sha256", "hook_points", "features")
    class HookPointsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    hook_points: _containers.ScalarMap[str, int]
    features: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., hook_points: _Optional[_Mapping[str, int]] = ..., features: _Optional[int] = ...) -> None: ...

class RuleFileStatus(_message.Message):
    __slots__ = ("path", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_rows_per_batch", "max_conversations", "max_conversation_id_length", "max_sequences_per_batch", "max_request_id_length", "max_role_length", "max_model_length", "max_attributes", "max_attribute_key_length", "max_attribute_value_length", "max_streams", "stream_idle_timeout_seconds", "max_stream_bytes")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONVERSATION_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ROLE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTE_KEY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTE_VALUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_rows_per_batch: int
    max_conversations: int
    max_conversation_id_length: int
    max_sequences_per_batch: int
    max_request_id_length: int
    max_role_length: int
    max_model_length: int
    max_attributes: int
    max_attribute_key_length: int
    max_attribute_value_length: int
    max_streams: int
    stream_idle_timeout_seconds: int
    max_stream_bytes: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_rows_per_batch: _Optional[int] = ..., max_conversations: _Optional[int] = ..., max_conversation_id_length: _Optional[int] = ..., max_sequences_per_batch: _Optional[int] = ..., max_request_id_length: _Optional[int] = ..., max_role_length: _Optional[int] = ..., max_model_length: _Optional[int] = ..., max_attributes: _Optional[int] = ..., max_attribute_key_length: _Optional[int] = ..., max_attribute_value_length: _Optional[int] = ..., max_streams: _Optional[int] = ..., stream_idle_timeout_seconds: _Optional[int] = ..., max_stream_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "packs", "rule_files", "rules", "limits", "accepted_dtypes", "sequence_formats", "conversation_slots", "event_formats", "sequence_flags")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    RULE_FILES_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_SLOTS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    version: str
    packs: _containers.RepeatedCompositeFieldContainer[PackStatus]
    rule_files: _containers.RepeatedCompositeFieldContainer[RuleFileStatus]
    rules: int
    limits: Limits
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[str]
    sequence_formats: _containers.RepeatedScalarFieldContainer[str]
    conversation_slots: int
    event_formats: _containers.RepeatedScalarFieldContainer[str]
    sequence_flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., packs: _Optional[_Iterable[_Union[PackStatus, _Mapping]]] = ..., rule_files: _Optional[_Iterable[_Union[RuleFileStatus, _Mapping]]] = ..., rules: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., accepted_dtypes: _Optional[_Iterable[str]] = ..., sequence_formats: _Optional[_Iterable[str]] = ..., conversation_slots: _Optional[int] = ..., event_formats: _Optional[_Iterable[str]] = ..., sequence_flags: _Optional[_Iterable[str]] = ...) -> None: ...
