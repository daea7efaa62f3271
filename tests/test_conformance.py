"""The conformance table can only name tests that exist."""

from __future__ import annotations

from tests.conformance import ROWS, table
from tests.conftest import REPO


def test_every_row_names_a_test() -> None:
    for node in ROWS:
        path, name = node.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), node


def test_rows_not_run_say_so() -> None:
    first = next(iter(ROWS))
    text = table({first: "passed"})
    assert text.count("✅") == 1 and text.count("not run") == len(ROWS) - 1
