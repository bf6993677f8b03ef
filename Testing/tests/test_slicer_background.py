"""The background-run machinery of the Slicer modules: job states and the process tree.

Real processes throughout. ``PythonSlicer`` is a launcher that starts the real interpreter as
a child; here a parent Python script that starts a worker Python process and waits stands in
for it, both printing their process ids, so the tests can check that cancel leaves no
descendant alive, and that neither cancel nor poll waits on pipes a descendant still holds.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from HRpQCTCore.background.process import (
    FINISHED_STATES,
    BackgroundProcess,
    JobState,
    popen_launcher,
    process_group,
    stop_process_tree,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")

#: The worker: ignores SIGTERM when asked (argv[1] == "ignore"), prints its pid, sleeps.
WORKER = """
    import os, signal, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"worker {os.getpid()}", flush=True)
    time.sleep(120)
    """
#: The launcher stand-in: starts the worker (which inherits its pipes), prints its pid, and
#: waits for the worker (argv[3] == "wait") or exits at once ("exit").
PARENT = """
    import os, signal, subprocess, sys
    if sys.argv[2] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
    print(f"parent {os.getpid()}", flush=True)
    if sys.argv[3] == "wait":
        worker.wait()
    """


def _scripts(tmp_path: Path) -> tuple[Path, Path]:
    parent, worker = tmp_path / "parent.py", tmp_path / "worker.py"
    parent.write_text(textwrap.dedent(PARENT), encoding="utf-8")
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    return parent, worker


class _Tree:
    """parent -> worker started in a BackgroundProcess, polled like the panel's timer."""

    def __init__(self, tmp_path: Path, sigterm: str = "default", parent_ends: str = "wait"):
        parent, worker = _scripts(tmp_path)
        self.job = BackgroundProcess([sys.executable, str(parent), str(worker), sigterm,
                                      parent_ends])
        self.slowest_poll_s = 0.0
        self.pids: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(self.pids) < 2:
            assert time.monotonic() < deadline, f"the tree did not start: {self.job.log}"
            self.poll()
            self.pids = {line.split()[0]: int(line.split()[1]) for line in self.job.log
                         if line.split()[:1] in (["parent"], ["worker"])}
            time.sleep(0.02)

    def poll(self) -> JobState:
        """One timer tick; records how long the slowest one took."""
        started = time.monotonic()
        state = self.job.poll()
        self.slowest_poll_s = max(self.slowest_poll_s, time.monotonic() - started)
        return state


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _survivors(pids, within_s: float = 3.0) -> list[int]:
    """The pids still alive after up to ``within_s`` (a SIGKILL takes a moment to land)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _kill_quietly(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# job states
# ------------------------------------------------------------------------------------------
def test_job_state_is_an_enum_of_every_state_a_run_uses():
    assert issubclass(JobState, enum.Enum)
    assert [state.value for state in JobState] == [
        "not started", "running", "loading", "succeeded", "failed", "cancelled"]
    # a str mixin: states compare with, and show as, their text
    assert JobState.RUNNING == "running" and JobState("cancelled") is JobState.CANCELLED
    assert str(JobState.FAILED) == "failed" and f"{JobState.NOT_STARTED}" == "not started"
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == FINISHED_STATES
    assert [state for state in JobState if state.finished] == [
        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
    assert [state for state in JobState if state.active] == [JobState.RUNNING,
                                                            JobState.LOADING]


# ------------------------------------------------------------------------------------------
# the process tree
# ------------------------------------------------------------------------------------------
@posix_only
def test_a_background_process_leads_a_process_group_of_its_own():
    process = popen_launcher([sys.executable, "-c", "import time; time.sleep(30)"],
                             dict(os.environ))
    try:
        assert process_group(process) == process.pid != os.getpgrp()
    finally:
        stop_process_tree(process, process_group(process), grace_s=1.0)
    assert process.poll() is not None


@posix_only
def test_a_process_in_our_own_group_is_stopped_alone():
    # Started without a group of its own (a custom launcher): signalling its "group" would
    # signal this test run, so only the process itself is stopped.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert process_group(process) is None
    stop_process_tree(process, None, grace_s=1.0)
    assert process.poll() is not None


@posix_only
@pytest.mark.parametrize("sigterm", ["default", "ignore"])
def test_cancel_stops_the_whole_process_tree_quickly(tmp_path, sigterm):
    tree = _Tree(tmp_path, sigterm)
    job, pids = tree.job, tree.pids
    job.KILL_AFTER_S = 0.5  # "ignore": both must be killed after the grace
    try:
        assert all(_alive(pid) for pid in pids.values())
        started = time.monotonic()
        job.cancel()
        cancel_s = time.monotonic() - started
        assert job.state == JobState.CANCELLED and job.exit_code != 0
        assert _survivors(pids.values()) == [], f"left running: {pids}"
        assert cancel_s < job.KILL_AFTER_S + 1.5, f"cancel took {cancel_s:.1f} s"
        started = time.monotonic()
        assert job.poll() == JobState.CANCELLED
        assert time.monotonic() - started < 0.2  # nothing left to wait for
        assert job.failure_message().startswith("Cancelled")
    finally:
        _kill_quietly(pids.values())


@posix_only
def test_poll_never_blocks_on_pipes_an_orphaned_descendant_holds(tmp_path):
    # The launcher exits while its worker lives on with the output pipes open: the readers
    # cannot end, and poll must not wait for them (it gives the output a moment, then ends
    # the run and the orphaned worker).
    tree = _Tree(tmp_path, parent_ends="exit")
    job, pids = tree.job, tree.pids
    job.OUTPUT_AFTER_EXIT_S = 0.5
    try:
        deadline = time.monotonic() + 10
        while not tree.poll().finished and time.monotonic() < deadline:
            assert _alive(pids["worker"])  # it holds the pipes until the run ends
            time.sleep(0.02)
        assert job.state == JobState.SUCCEEDED and job.exit_code == 0
        assert tree.slowest_poll_s < 0.2, f"poll blocked for {tree.slowest_poll_s:.1f} s"
        assert _survivors(pids.values()) == [], "the orphaned worker was left running"
    finally:
        _kill_quietly(pids.values())
