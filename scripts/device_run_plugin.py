"""pytest plugin of scripts/device_run.sh: a record of the tests a process finished, so a shard whose
process ended inside a test (a kernel that hangs, a crash on an illegal address) resumes after it,
and, where pytest-timeout is not installed, a per-test watchdog that ends such a process.

Environment (set by device_run.sh; the plugin does nothing without them):
  DEVICE_RUN_DONE          file: node ids of finished tests, one a line (appended; deselected on resume)
  DEVICE_RUN_CURRENT       file: the node id of the test running now
  DEVICE_RUN_HUNG          file: node ids that ended a process (deselected on resume)
  DEVICE_RUN_DURATIONS     file: "seconds node id" of each finished test (the slowest go into pytest.log)
  DEVICE_RUN_FAILURES      file: each failure's node id and the last lines of its traceback, written
                           when it happens (a shard cut at its budget never prints pytest's summary)
  DEVICE_RUN_TEST_TIMEOUT  seconds; > 0: faulthandler dumps every thread's stack and exits the process
                           once a test runs longer (it fires inside a CUDA call too, where a Python
                           signal handler would never run)

    python -m pytest tests -p device_run_plugin        (with scripts/ on PYTHONPATH)
"""

import faulthandler
import os

import pytest

_TRACEBACK_LINES = 30
_durations: dict[str, float] = {}


def _lines(variable: str) -> set[str]:
    path = os.environ.get(variable)
    if not path or not os.path.exists(path):
        return set()
    with open(path) as handle:
        return {line.rstrip("\n") for line in handle if line.strip()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = _lines("DEVICE_RUN_DONE") | _lines("DEVICE_RUN_HUNG")
    if not skip:
        return
    deselected = [item for item in items if item.nodeid in skip]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid not in skip]


def _write(variable: str, text: str, mode: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, mode) as handle:
            handle.write(text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _write("DEVICE_RUN_CURRENT", item.nodeid + "\n", "w")
    limit = float(os.environ.get("DEVICE_RUN_TEST_TIMEOUT", "0") or 0)
    if limit > 0:
        faulthandler.dump_traceback_later(limit, exit=True)
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()
    _write("DEVICE_RUN_DONE", item.nodeid + "\n", "a")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        _write("DEVICE_RUN_DURATIONS", f"{_durations.pop(report.nodeid):.1f} {report.nodeid}\n", "a")
    if report.failed:
        tail = "\n".join(report.longreprtext.splitlines()[-_TRACEBACK_LINES:])
        _write("DEVICE_RUN_FAILURES", f"--- {report.when} FAILED {report.nodeid}\n{tail}\n", "a")
