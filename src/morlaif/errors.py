"""The one error type for bad input: the CLI prints it on one line and exits 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: an unknown key, a wrong type, a malformed line, a missing file.

    `str(err)` is one line naming what is wrong and where (file, line, key).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.message, self.file, self.line, self.key = message, file, line, key
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"key '{self.key}': " if self.key else ""
        # One line, always: a key or message with a newline in it must not break the contract.
        return f"{where}{key}{self.message}".replace("\r", "\\r").replace("\n", "\\n")


class RunError(RuntimeError):
    """A stage cannot finish although its input is fine: the judge endpoint keeps failing, training keeps
    producing NaN/inf. The CLI prints it on one line and exits 1; the stage's manifest says 'failed'."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")
