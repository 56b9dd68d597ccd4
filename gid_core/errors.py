"""Problems the engine reports as data: where (a location in its inputs) and what.

A ``Problem``'s ``loc`` is a path into the engine's own inputs, e.g. ``("hyperparameters",
"batch_size")`` of a ``JobConfig`` or ``("images",)`` of a COCO dataset, so a caller (the REST
service) maps it to its own fields through a table and never reads the message text. The message
is a sentence for people and stands on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the engine's inputs; ``code`` is a short machine-readable kind."""

    loc: Loc
    message: str
    code: str = "value_error"


class ProblemsError(ValueError):
    """Inputs the engine refuses; ``problems`` lists every problem found (at least one)."""

    summary = "invalid input"

    def __init__(self, problems: Iterable[Problem], source: str | Path | None = None) -> None:
        self.problems = list(problems)
        if not self.problems:
            raise ValueError(f"{type(self).__name__} needs at least one problem")
        self.source = str(source) if source is not None else None
        where = f" {self.source}" if self.source else ""
        lines = [f"{self.summary}{where}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p.message}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigFileError(ValueError):
    """A config file that cannot be used (missing, unreadable, bad syntax, not a mapping, invalid
    settings); the message names the file and what is wrong."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)
