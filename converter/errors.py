"""Errors a user can cause; the CLI prints them as one line with a hint, never a traceback."""

from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """A conversion cannot proceed; the message names the file and says what to do."""

    def __init__(self, message: str, hint: str = "", path: Path | str | None = None) -> None:
        self.hint = hint
        self.path = Path(path) if path is not None else None
        where = f"{path}: " if path is not None else ""
        super().__init__(where + message)


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint's architecture is not one we convert."""


class SourceNotFoundError(ConversionError):
    """The source folder or hub repository cannot be found or reached."""


class VerificationFailed(ConversionError):
    """The converted model does not match its reference; `report` says how."""

    def __init__(self, report: object, path: Path | str | None = None) -> None:
        super().__init__("verification failed; no output was kept", "see the report above", path)
        self.report = report
