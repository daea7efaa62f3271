"""Write a file under a temporary name and rename it into place only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from converter.errors import ConversionError


def partial_path(final: Path, stage: str = "part") -> Path:
    """A hidden sibling of `final` whose name cannot be mistaken for a model (no .gguf suffix)."""
    return final.with_name(f".{final.name}.{stage}-{os.getpid()}")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse early when the folder's disk cannot hold `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConversionError(
            f"not enough free disk space for {what}: need {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free",
            "free some space or choose another --out folder",
            folder,
        )


@contextlib.contextmanager
def atomic_output(final: Path, stage: str = "part") -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it to `final`, else remove it."""
    temp = partial_path(final, stage)
    try:
        yield temp
        with temp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written model behind
        temp.unlink(missing_ok=True)
        raise
