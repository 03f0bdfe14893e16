"""Bad inputs: run every `badinput` test and list, per case, the exact message the user sees.

The tests check each message with `pytest.raises(..., match=...)`; a small plugin wraps
`pytest.raises` while they run and records the text of every exception it caught, by test. A
case that ends without an error (a SQL-looking note stored verbatim, a recomputed artifact)
records what the user sees instead with `record_property("user_sees", ...)`. Nothing is imported
from the tests themselves. Tests run with --basetemp /tmp/tdx-badinput (cleared by pytest first), so
the file paths in the messages are the same from one run to the next. --quick runs every case too
(there is no smaller version of a list of cases); --smoke runs the first few cases of the first test
file that has any, in a temporary basetemp (a smoke run may run beside a full one).

    python benchmarks/bad_inputs.py [--quick | --smoke] [--json PATH] [--no-results]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from common import markdown_table, parser, report

ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = ("cases",)
SMOKE_CASES = 3
"""Cases a smoke run keeps: enough for both kinds of record (a caught error and a `user_sees` property)."""


class RecordingRaises:
    """pytest.raises as a context manager, reporting the exception it caught to `record`."""

    def __init__(self, context, record):
        self.context, self.record = context, record

    def __enter__(self):
        self.info = self.context.__enter__()
        return self.info

    def __exit__(self, *exc_info):
        suppressed = self.context.__exit__(*exc_info)
        if suppressed:
            self.record(self.info.value)
        return suppressed


class MessageRecorder:
    """A pytest plugin: the badinput tests in collection order (the first `limit` of them), and the messages each one saw."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.items: list[pytest.Item] = []
        self.messages: dict[str, list[str]] = defaultdict(list)
        self.failed: list[str] = []
        self.current: str | None = None

    def pytest_configure(self, config):
        real_raises = pytest.raises

        def raises(*args, **kwargs):
            result = real_raises(*args, **kwargs)
            if isinstance(result, pytest.ExceptionInfo):  # the pytest.raises(Error, function, ...) form
                self.record(result.value)
                return result
            return RecordingRaises(result, self.record)

        pytest.raises = raises

    def record(self, error: BaseException) -> None:
        """Keep the text of an error a test caught (an exit status is no message: such tests record stderr)."""
        if self.current is not None and not isinstance(error, SystemExit):
            self.messages[self.current].append(str(error))

    @pytest.hookimpl(trylast=True)  # after -m badinput has deselected the other tests
    def pytest_collection_modifyitems(self, config, items):
        if self.limit is not None and len(items) > self.limit:
            config.hook.pytest_deselected(items=items[self.limit :])
            del items[self.limit :]

    def pytest_collection_finish(self, session):
        self.items = list(session.items)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = None

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)
        if report.when == "call":
            self.messages[report.nodeid] += [value for name, value in report.user_properties if name == "user_sees"]


def case_name(item: pytest.Item) -> str:
    """The test's docstring (first line), else its name in words; with the parameter set's id."""
    doc = (getattr(item, "function", None).__doc__ or "").strip()
    name = doc.splitlines()[0] if doc else item.originalname.removeprefix("test_").replace("_", " ")
    callspec = getattr(item, "callspec", None)
    return f"{name} [{callspec.id}]" if callspec is not None else name


def markdown_cell(text: str) -> str:
    """Text whole in one table cell: pipes escaped, line breaks as <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>").replace("\t", " ")


def test_paths(arguments: argparse.Namespace) -> list[str]:
    """Where the cases are: every test, or on a smoke run the first test file holding a badinput case."""
    if not arguments.smoke:
        return ["tests"]
    first = next(path for path in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.badinput" in path.read_text())
    return [str(first.relative_to(ROOT))]


@contextlib.contextmanager
def basetemp(arguments: argparse.Namespace) -> Iterator[Path]:
    """A fixed folder, so the paths in the messages stay put; a temporary one on a smoke run, which writes no table."""
    if not arguments.smoke:
        yield Path(tempfile.gettempdir()) / "tdx-badinput"
        return
    with tempfile.TemporaryDirectory(prefix="tdx-badinput-smoke-") as directory:
        yield Path(directory) / "basetemp"


def main() -> None:
    arguments = parser("Every badinput case and the message the user sees").parse_args()
    recorder = MessageRecorder(limit=SMOKE_CASES if arguments.smoke else None)
    os.chdir(ROOT)
    with basetemp(arguments) as folder:
        status = pytest.main(["-m", "badinput", "-q", "-p", "no:cacheprovider", f"--basetemp={folder}", *test_paths(arguments)],
                             plugins=[recorder])
    if status != 0 or recorder.failed:
        sys.exit(f"badinput tests failed ({', '.join(recorder.failed) or f'pytest exit status {status}'}); no table written")

    cases = [{"case": case_name(item), "test": item.nodeid, "message": "\n".join(recorder.messages[item.nodeid])}
             for item in recorder.items]
    silent = [case["test"] for case in cases if not case["message"]]
    if silent:
        sys.exit(f"these badinput tests recorded no message: {', '.join(silent)}")
    rows = [[markdown_cell(case["case"]), f"`{case['test']}`", markdown_cell(case["message"])] for case in cases]
    body = f"{len(cases)} cases, every one passing.\n\n" + markdown_table(["case", "test", "what the user sees"], rows)
    report("badinput", "Bad inputs and the messages users see", body, arguments, {"cases": cases})


if __name__ == "__main__":
    main()
