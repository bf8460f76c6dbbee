"""SpdError: every problem a user can cause, located in their text and said in plain words."""

from __future__ import annotations

import difflib


class SpdError(Exception):
    """An error in a ``.spd`` pattern, an override or an argument, with where and how to fix it.

    ``str(err)`` is the full report::

        patterns/x.spd:3:12: unknown primitive 'locl'
            attend locl(5)
                   ^^^^
        hint: did you mean local?
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        source_line: str | None = None,
        hint: str | None = None,
        length: int = 1,
    ):
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.source_line = source_line
        self.hint = hint
        self.length = max(1, length)
        super().__init__(self.format())

    @property
    def location(self) -> str:
        parts = [self.file or "<string>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def format(self) -> str:
        out = [f"{self.location}: {self.message}"]
        if self.source_line is not None and self.column is not None:
            src = self.source_line.rstrip("\n").expandtabs(1)
            out.append("    " + src)
            out.append("    " + " " * (self.column - 1) + "^" * min(self.length, max(1, len(src) - self.column + 1)))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    @classmethod
    def at(
        cls,
        message: str,
        text: str,
        line: int,
        column: int,
        *,
        file: str | None = None,
        hint: str | None = None,
        length: int = 1,
    ) -> SpdError:
        """An error at (line, column) of ``text`` (1-based), with that source line attached."""
        lines = text.split("\n")  # line numbers as the parser counts them (only \n)
        src = lines[line - 1] if 1 <= line <= len(lines) else ""
        return cls(message, file=file, line=line, column=column, source_line=src, hint=hint, length=length)


def did_you_mean(name: str, choices) -> str | None:
    """'did you mean X?' for the closest choice, or None."""
    best = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {best[0]}?" if best else None
