"""Safety rules: YAML rule files compiled to vectorised, stateful per-token evaluation.

``load_rules`` validates and compiles rule files (raising ``RuleLoadError`` with every located
issue); ``RuleEngine`` evaluates the resulting ``RuleSet`` on batches of feature values.
"""

from monitor.rules.engine import EvaluationResult, Firing, RuleEngine, SequenceSlice
from monitor.rules.errors import RuleIssue, RuleLoadError, SourceLocation
from monitor.rules.loader import Rule, RuleSet, load_rules

__all__ = [
    "EvaluationResult",
    "Firing",
    "Rule",
    "RuleEngine",
    "RuleIssue",
    "RuleLoadError",
    "RuleSet",
    "SequenceSlice",
    "SourceLocation",
    "load_rules",
]
