"""Exceptions and located problem reports.

Every user-facing error in twin says *where* (file, row, field), *what was expected*,
*what was received* and *how to fix it*. Loaders collect every problem before raising,
so a user fixes a file in one pass instead of one error at a time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Literal

__all__ = [
    "TwinError",
    "InputError",
    "PatientFileError",
    "Problem",
    "ProblemList",
    "close_matches",
]

Severity = Literal["error", "warning", "note"]


class TwinError(Exception):
    """Base class of every error twin raises on purpose."""


class InputError(TwinError, ValueError):
    """A user-supplied value, file or option is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One located finding about an input file.

    Attributes
    ----------
    severity : "error" (the file cannot be used), "warning" (usable, but check it) or
        "note" (the loader normalised something, e.g. converted a unit; nothing is silent).
    file : file name relative to the bundle (or the bundle itself).
    row : where in the file: for a CSV table the line number, as a spreadsheet shows it
        (the header is row 1, the first data row is row 2); for a table inside a JSON/YAML
        file the 1-based position of the record in its list; for a syntax error the line;
        ``None`` for whole-file or header problems.
    field : column or key name, ``None`` for whole-file problems.
    message : what is wrong, in one sentence.
    expected, received : what the loader wanted and what it found.
    fix : how to fix it.
    """

    severity: Severity
    file: str
    message: str
    row: int | None = None
    field: str | None = None
    expected: str | None = None
    received: str | None = None
    fix: str | None = None

    @property
    def location(self) -> str:
        loc = self.file
        if self.row is not None:
            loc += f" row {self.row}"
        if self.field is not None:
            loc += f", field '{self.field}'"
        return loc

    def format(self) -> str:
        """One readable paragraph: location, message, expected/received, fix."""
        text = f"{self.severity}: {self.location}: {self.message}"
        if self.expected is not None:
            text += f"\n    expected: {self.expected}"
        if self.received is not None:
            text += f"\n    received: {self.received}"
        if self.fix is not None:
            text += f"\n    fix: {self.fix}"
        return text

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.format()


@dataclass
class ProblemList:
    """An ordered collection of problems with helpers to add located findings."""

    items: list[Problem] = field(default_factory=list)

    def add(self, severity: Severity, file: str, message: str, **kw) -> None:
        self.items.append(Problem(severity, file, message, **kw))

    def error(self, file: str, message: str, **kw) -> None:
        self.add("error", file, message, **kw)

    def warning(self, file: str, message: str, **kw) -> None:
        self.add("warning", file, message, **kw)

    def note(self, file: str, message: str, **kw) -> None:
        self.add("note", file, message, **kw)

    def extend(self, other: Iterable[Problem]) -> None:
        self.items.extend(other)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "warning"]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "note"]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class PatientFileError(InputError):
    """A patient file has one or more errors; ``problems`` lists every one of them."""

    def __init__(self, path: str, problems: Iterable[Problem]):
        self.path = str(path)
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        head = f"{self.path}: {len(errors)} problem(s) prevent loading this patient file"
        body = "\n".join(p.format() for p in errors)
        super().__init__(f"{head}\n{body}")


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """A 'did you mean ...?' phrase, or an empty string when nothing is close."""
    matches = difflib.get_close_matches(str(word).lower(), [c.lower() for c in candidates], n=n, cutoff=0.6)
    lookup = {c.lower(): c for c in candidates}
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(lookup[m]) for m in matches) + "?"
