"""SpdError: every problem a user can cause, located in their text and said in plain words.

Standard library only: generated modules embed this file.
"""

from __future__ import annotations


class SpdError(Exception):
    """An error in a ``.spd`` pattern, an override, an argument or a resource limit, with how to fix it.

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
        self.message, self.file, self.line, self.column = message, file, line, column
        self.source_line, self.hint, self.length = source_line, hint, max(1, length)
        super().__init__(self.format())

    @property
    def location(self) -> str | None:
        """``file:line:col`` (``<string>`` for text without a file name); None when nothing is located."""
        if self.file is None and self.line is None:
            return None
        parts = [self.file or "<string>", self.line, self.column if self.line is not None else None]
        return ":".join(str(p) for p in parts if p is not None)

    def format(self) -> str:
        """The full report: location and message, the source line with a caret under the offender, the hint."""
        out = [f"{self.location}: {self.message}" if self.location else self.message]
        if self.source_line is not None and self.column is not None:
            src = self.source_line.rstrip("\n").expandtabs(1)
            width = min(self.length, max(1, len(src) - self.column + 1))
            out += ["    " + src, "    " + " " * (self.column - 1) + "^" * width]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)
