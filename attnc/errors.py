"""The errors attnc shows its users: one class per audience, each with a location."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """Where something came from: a file (or '<string>', '<callback>') and a 1-based line/column."""
    file: str = "<string>"
    line: int = 0
    col: int = 0
    text: str = ""          # the whole source line, for the caret display

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file


class AttncError(Exception):
    """Base of every error attnc raises on purpose."""


class SpecError(AttncError):
    """A variant (an .attn file or a set of callbacks) that cannot be compiled."""

    def __init__(self, message: str, loc: Loc | None = None, expected: str | None = None):
        self.message, self.loc, self.expected = message, loc, expected
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.loc}: {self.message}" if self.loc else self.message
        lines = [head]
        if self.loc and self.loc.text:
            lines.append("    " + self.loc.text.rstrip("\n"))
            lines.append("    " + " " * max(self.loc.col - 1, 0) + "^")
        if self.expected:
            lines.append(f"expected: {self.expected}")
        return "\n".join(lines)


class CallError(AttncError, ValueError):
    """A compiled variant called with arguments of the wrong shape, dtype, device or value."""


def loc_in(source: str, file: str, line: int, col: int) -> Loc:
    """A Loc pointing into `source`, carrying the line's text."""
    lines = source.splitlines()
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    return Loc(file, line, col, text)
