"""The errors attnc shows its users: one class per audience, each with a location."""
from __future__ import annotations

import unicodedata
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
            lines.append("    " + shown(self.loc.text))
            lines.append("    " + " " * max(self.loc.col - 1, 0) + "^")
        if self.expected:
            lines.append(f"expected: {self.expected}")
        return "\n".join(lines)


class CallError(AttncError, ValueError):
    """A compiled variant called with arguments of the wrong shape, dtype, device or value."""


def source_lines(source: str) -> list[str]:
    """The lines of a spec as the parser counts them: only '\n' ends a line (str.splitlines also breaks at
    '\r', '\x0b', '\x0c', '\x1c'-'\x1e', '\x85', U+2028 and U+2029, which would shift every line after)."""
    lines = source.split("\n")
    return lines[:-1] if len(lines) > 1 and lines[-1] == "" else lines


def loc_in(source: str, file: str, line: int, col: int) -> Loc:
    """A Loc pointing into `source`, carrying the line's text."""
    lines = source_lines(source)
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    return Loc(file, line, col, text)


def shown(text: str) -> str:
    """A source line fit to print above a caret: one column per character, so the caret stays under its
    column, and nothing that would break the line or reorder it (control, format and separator characters
    become spaces; a '\r' would return the terminal's cursor to the start of the line)."""
    return "".join(" " if unicodedata.category(ch) in _BLANKED else ch for ch in text.rstrip("\r\n"))


_BLANKED = {"Cc", "Cf", "Zl", "Zp", "Zs"}
