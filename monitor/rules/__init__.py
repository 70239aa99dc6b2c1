"""Safety rules: YAML rule files compiled to vectorised, stateful per-token evaluation.

``load_rules`` validates and compiles rule files (raising ``RuleLoadError`` with every located
issue); ``RuleEngine`` evaluates the resulting ``RuleSet`` on batches of feature values;
``RuleReloader`` notices edited rule files and reloads them without raising. Loaded with their
packs' ``PackFeatures``, rules may write ``pooled(<alias>)``: the probe pooled as its pack
recorded it was fitted (``monitor.rules.pooling``).
"""

from monitor.rules.engine import (
    EvaluationResult,
    FeatureBlock,
    Firing,
    RuleEngine,
    SequenceSlice,
    SliceColumns,
    SliceList,
)
from monitor.rules.errors import RuleIssue, RuleLoadError, SourceLocation
from monitor.rules.loader import Rule, RuleSet, load_rules
from monitor.rules.model import RuleException
from monitor.rules.pooling import PackFeatures
from monitor.rules.reload import ReloadResult, RuleReloader

__all__ = [
    "EvaluationResult",
    "FeatureBlock",
    "Firing",
    "PackFeatures",
    "ReloadResult",
    "Rule",
    "RuleEngine",
    "RuleException",
    "RuleIssue",
    "RuleLoadError",
    "RuleReloader",
    "RuleSet",
    "SequenceSlice",
    "SliceColumns",
    "SliceList",
    "SourceLocation",
    "load_rules",
]
