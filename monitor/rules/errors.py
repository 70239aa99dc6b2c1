"""Located errors for rule files: every problem points at a file, line and column."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLocation:
    """A point in a rules file; line and column are 1-based like editors and compilers show."""

    path: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    def issue(self, message: str) -> RuleIssue:
        """A RuleIssue at this location."""
        return RuleIssue(self.path, self.line, self.col, message)


@dataclass(frozen=True)
class RuleIssue:
    """One validation problem, printed as ``path:line:col: message``."""

    path: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.message}"


class RuleLoadError(ValueError):
    """Raised once per load with every problem found, so one edit cycle fixes them all."""

    def __init__(self, issues: Iterable[RuleIssue]) -> None:
        self.issues: list[RuleIssue] = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


class ExpressionError(Exception):
    """Internal: an expression failed to parse or check; the loader turns it into issues."""

    def __init__(self, issues: Iterable[RuleIssue]) -> None:
        self.issues: list[RuleIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
