"""A polled background process that the GUI can cancel, process tree and all.

The Slicer modules never run engine work in the GUI thread: they start Slicer's Python
(``PythonSlicer``) on an ``hrpqct`` command and poll it from a ``QTimer``.
:class:`BackgroundProcess` does the part that needs no Qt: reader threads collect the child's
output, :meth:`~BackgroundProcess.poll` never blocks, and :meth:`~BackgroundProcess.cancel`
stops the whole process tree.

Why the tree: ``PythonSlicer`` is a launcher that starts the real interpreter as a child and
has no signal handling, so terminating the launcher alone leaves the worker running (and
holding the output pipes open). :func:`popen_launcher` therefore starts the command in a
process group (POSIX session; Windows process group) of its own, and
:func:`stop_process_tree` signals that group (POSIX: SIGTERM, then SIGKILL after a grace) or
has Windows end the tree (``taskkill /T /F``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from HRpQCTCore.background.protocol import (
    CANCEL_EXIT_CODE,
    EXIT_CODE_ADVICE,
    STAGE_SPANS,
    ProgressUpdate,
    describe_failure,
    overall_fraction,
    parse_error_line,
    parse_progress_line,
)

__all__ = [
    "JobState",
    "FINISHED_STATES",
    "ProcessLike",
    "Launcher",
    "popen_launcher",
    "process_group",
    "stop_process_tree",
    "BackgroundProcess",
    "ProcessRun",
    "MODULE_FOLDER_NAMES",
    "module_folders",
    "engine_environment",
    "python_executable",
]


class JobState(str, enum.Enum):
    """State of a run: a background process, or a module's run built on one or on a thread.

    A ``str`` mixin, so states compare equal to their text and show plainly in logs.
    """

    NOT_STARTED = "not started"
    RUNNING = "running"
    #: The work is done and its result is being loaded into the scene (GUI thread).
    LOADING = "loading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Whether the run has ended (succeeded, failed or cancelled)."""
        return self in FINISHED_STATES

    @property
    def active(self) -> bool:
        """Whether the run is going (started and not finished)."""
        return self in (JobState.RUNNING, JobState.LOADING)


#: The states a run ends in.
FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ProcessLike(Protocol):
    """What :class:`BackgroundProcess` needs of a started process (``subprocess.Popen``)."""

    pid: int
    stdout: Iterable[str] | None
    stderr: Iterable[str] | None
    returncode: int | None

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


#: ``launcher(command, env) -> process``.
Launcher = Callable[[Sequence[str], Mapping[str, str]], ProcessLike]


def popen_launcher(command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
    """Start ``command`` with text pipes, in a process group of its own (see module docstring).

    On Windows also without a console window.
    """
    options: dict = {}
    if os.name == "nt":
        options["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                    | subprocess.CREATE_NO_WINDOW)
    else:
        options["start_new_session"] = True
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                            errors="replace", bufsize=1, env=dict(env), **options)


def process_group(process: ProcessLike) -> int | None:
    """The POSIX process group ``process`` leads, or None (Windows; not a group leader).

    Call it while the process is not yet reaped. Our own group is never returned, so
    stopping a process started without a group of its own can never signal this program.
    """
    if os.name == "nt":
        return None
    try:
        group = os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
    return group if group == process.pid and group != os.getpgrp() else None


#: Exit code reported for a cancelled child whose own code is not known yet (-SIGKILL).
_KILLED_EXIT_CODE = -9
#: Seconds between SIGTERM to the process group and SIGKILL.
TERMINATE_GRACE_S = 2.0


def stop_process_tree(process: ProcessLike, group: int | None = None,
                      grace_s: float = TERMINATE_GRACE_S) -> None:
    """Stop ``process`` and every process it started; returns within about ``grace_s + 1`` s.

    Parameters
    ----------
    process:
        The started process (also after it has exited: its children may live on).
    group:
        Its process group (:func:`process_group`, taken when it started); None stops the
        process alone unless on Windows, where the tree is found from the process id.
    grace_s:
        How long the processes may take to exit after SIGTERM before they are killed.
    """
    if os.name == "nt":
        _stop_windows_tree(process)
    elif group is not None:
        _stop_posix_group(process, group, grace_s)
    else:
        _stop_single(process, grace_s)


def _signal_group(group: int, signal_number: int) -> None:
    # No such process: nobody is left in the group; permission: only processes not ours are.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal_number)


def _stop_posix_group(process: ProcessLike, group: int, grace_s: float) -> None:
    _signal_group(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    # Whatever ignored SIGTERM, or was started by a leader that already exited, goes now.
    _signal_group(group, signal.SIGKILL)
    _reap(process)


def _stop_windows_tree(process: ProcessLike) -> None:
    # taskkill finds the tree from the parent's id; it cannot be graceful for GUI-less children.
    if process.poll() is None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # then kill() below
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    if process.poll() is None:
        process.kill()
    _reap(process)


def _stop_single(process: ProcessLike, grace_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    _reap(process)


def _reap(process: ProcessLike, timeout_s: float = 1.0) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):  # poll() reads the exit code later
        process.wait(timeout=timeout_s)


@dataclass
class _Output:
    """What the child printed, drained from the reader threads' queue."""

    progress: ProgressUpdate | None = None
    error_message: str | None = None
    log: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


class BackgroundProcess:
    """A child process whose output is read by threads and collected on :meth:`poll`.

    The GUI calls :meth:`poll` from a timer and :meth:`cancel` from a button: neither waits
    on the reader threads, so Slicer stays responsive even when something still holds the
    child's pipes. Scripts and tests call :meth:`wait`.

    Parameters
    ----------
    command, env:
        What to run.
    launcher:
        ``launcher(command, env) -> process``; :func:`popen_launcher` by default (a process
        group of its own, so :meth:`cancel` stops the whole tree).
    on_log:
        Called (from :meth:`poll`, in the caller's thread) with each non-progress line.
    stage_spans:
        Share of the whole run of each progress stage (for :attr:`fraction`).
    advice, program:
        What to do by exit code, and what the process does, for :meth:`failure_message`
        (see :func:`~HRpQCTCore.background.protocol.describe_failure`).
    """

    #: Seconds :meth:`cancel` lets the processes exit after SIGTERM before killing them.
    KILL_AFTER_S = TERMINATE_GRACE_S
    #: Seconds after the child's exit that :meth:`poll` keeps collecting output still in the
    #: pipes (a descendant that outlives the child may hold them open: it is not waited for
    #: longer, and it is killed with the child's process group).
    OUTPUT_AFTER_EXIT_S = 2.0

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None,
                 launcher: Launcher = popen_launcher,
                 on_log: Callable[[str], None] | None = None,
                 stage_spans: Mapping[str, tuple[float, float]] = STAGE_SPANS,
                 advice: Mapping[int, str] = EXIT_CODE_ADVICE,
                 program: str = "segmentation") -> None:
        self.command = list(command)
        self._advice, self._program = advice, program
        self._on_log = on_log
        self._stage_spans = stage_spans
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._output = _Output()
        self._cancel_requested = False
        self.state = JobState.RUNNING
        self.exit_code: int | None = None
        self.fraction = 0.0
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._exited_at: float | None = None
        self._process = launcher(self.command, dict(os.environ if env is None else env))
        self._group = process_group(self._process)
        self._readers = [reader for reader in (self._start_reader(self._process.stdout, "stdout"),
                                               self._start_reader(self._process.stderr, "stderr"))
                         if reader is not None]

    def _start_reader(self, stream: Iterable[str] | None, name: str) -> threading.Thread | None:
        if stream is None:
            return None

        def read() -> None:
            try:
                for line in stream:
                    self._lines.put((name, line.rstrip("\r\n")))
            except (OSError, ValueError):
                pass  # the pipe was closed under us
            finally:
                self._lines.put((name, None))  # end of this stream

        thread = threading.Thread(target=read, name=f"hrpqct-{name}", daemon=True)
        thread.start()
        return thread

    @property
    def pid(self) -> int:
        """Process id of the child (the launcher, when it is ``PythonSlicer``)."""
        return self._process.pid

    # -- output ----------------------------------------------------------------------------
    @property
    def progress(self) -> ProgressUpdate | None:
        """The latest progress line."""
        return self._output.progress

    @property
    def error_message(self) -> str | None:
        """The child's ``error:`` message, if it printed one."""
        return self._output.error_message

    @property
    def log(self) -> list[str]:
        """Every non-progress line the child printed (stdout and stderr)."""
        return list(self._output.log)

    def _drain(self) -> None:
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self._take_line(name, line)

    def _take_line(self, name: str, line: str) -> None:
        update = parse_progress_line(line)
        if update is not None:
            self._output.progress = update
            self.fraction = overall_fraction(update, self.fraction, self._stage_spans)
            return
        message = parse_error_line(line)
        if message is not None:
            self._output.error_message = message
        self._output.log.append(line)
        if name == "stderr":
            self._output.stderr_tail = [*self._output.stderr_tail, line][-40:]
        if self._on_log is not None:
            self._on_log(line)

    def _readers_done(self) -> bool:
        return not any(reader.is_alive() for reader in self._readers)

    # -- control ---------------------------------------------------------------------------
    def poll(self) -> JobState:
        """Collect new output and update :attr:`state`; never blocks."""
        self._drain()
        if self.state.finished:
            return self.state
        code = self._process.poll()
        if code is None:
            return self.state
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        if not self._readers_done():
            if time.monotonic() - self._exited_at < self.OUTPUT_AFTER_EXIT_S:
                return self.state  # the last lines are still on their way: next poll
            self._stop_leftovers()
        self._finish(code)
        return self.state

    def _stop_leftovers(self) -> None:
        """The child has exited but something it started still holds its pipes: that
        process is an orphan of a finished run, so it is killed with the child's group."""
        if self._group is not None:
            _signal_group(self._group, signal.SIGKILL)

    def _finish(self, code: int) -> None:
        self._drain()
        self.exit_code = code
        self.finished_at = time.monotonic()
        if self._cancel_requested or code == CANCEL_EXIT_CODE:
            self.state = JobState.CANCELLED
        elif code == 0:
            self.state = JobState.SUCCEEDED
        else:
            self.state = JobState.FAILED

    @property
    def seconds(self) -> float:
        """Seconds since the process started."""
        return (self.finished_at or time.monotonic()) - self.started_at

    def cancel(self) -> None:
        """Stop the child and everything it started; the state is final on return.

        Returns within about :attr:`KILL_AFTER_S` + 1 s, without waiting on the readers.
        """
        if self.state.finished:
            return
        self._cancel_requested = True
        stop_process_tree(self._process, self._group, self.KILL_AFTER_S)
        code = self._process.poll()
        # Not reaped yet (a kill is being delivered): report it as killed.
        self._finish(code if code is not None else _KILLED_EXIT_CODE)

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.05) -> JobState:
        """Poll until the child ends; on timeout cancel it and raise ``TimeoutError``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.poll().finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"The background process did not finish in {timeout_s} s")
            time.sleep(interval_s)
        return self.state

    def failure_message(self) -> str:
        """What went wrong and what to do (for a failed or cancelled run)."""
        if self.state == JobState.CANCELLED:
            return "Cancelled: nothing was changed."
        return describe_failure(self.exit_code if self.exit_code is not None else 1,
                                self._output.error_message, self._output.stderr_tail,
                                advice=self._advice, program=self._program)


# ------------------------------------------------------------------------------------------
# the child's interpreter and environment
# ------------------------------------------------------------------------------------------
#: The two module folders, each holding engine packages: the core, the segmentation engine
#: and the pipeline in the Segmenter's; the radiomics engine in the Radiomics module's.
MODULE_FOLDER_NAMES = ("HRpQCTSegmenter", "HRpQCTRadiomics")



class ProcessRun:
    """What a module's run built on a :class:`BackgroundProcess` shares: waiting, cancelling
    and the log. A subclass sets ``process`` (once started) and ``state``, and implements
    ``poll()``, which turns the process's progress and end into its own state and message.
    """

    process: BackgroundProcess | None = None
    state: JobState = JobState.NOT_STARTED

    def poll(self) -> JobState:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def wait(self, timeout_s: float | None = None) -> JobState:
        """Block until the run ends (batch use, scripts and tests); returns the final state.

        Raises
        ------
        TimeoutError
            When it did not end within ``timeout_s`` (it was cancelled).
        """
        if self.process is None:
            raise RuntimeError("start() the run first")
        try:
            self.process.wait(timeout_s)
        finally:
            self.poll()
        return self.state

    def cancel(self) -> None:
        """Stop the process and everything it started."""
        if self.process is not None and self.state == JobState.RUNNING:
            self.process.cancel()
            self.poll()

    def log_lines(self) -> list[str]:
        """Everything the process printed (the log box, error details, bug reports)."""
        return self.process.log if self.process is not None else []


def module_folders(segmenter_folder: str | os.PathLike | None = None) -> list[Path]:
    """The folders that must be on the child's ``PYTHONPATH`` for every ``hrpqct`` command.

    In a source tree (and with Slicer's "Additional module paths") the two module folders
    are siblings; in an installed extension all scripted modules share one folder. Both
    layouts give the folders that exist among this one and its sibling.
    """
    here = Path(segmenter_folder) if segmenter_folder else Path(__file__).resolve().parents[2]
    found = [here]
    sibling = here.parent / MODULE_FOLDER_NAMES[1]
    if here.name == MODULE_FOLDER_NAMES[0] and sibling.is_dir():
        found.append(sibling)
    return found


def engine_environment(engine_parent_dir: str | os.PathLike | Sequence[str | os.PathLike],
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the child: the engine importable, output unbuffered, UTF-8.

    ``engine_parent_dir`` is the folder holding the engine packages (the module's folder in
    Slicer), or several (:func:`module_folders`: the radiomics command needs both modules'
    packages); they are put first on ``PYTHONPATH``.
    """
    env = dict(os.environ if base is None else base)
    folders = ([engine_parent_dir] if isinstance(engine_parent_dir, (str, os.PathLike))
               else list(engine_parent_dir))
    parts = [str(f) for f in folders] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                         if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def python_executable() -> str:
    """Slicer's stand-alone Python (``PythonSlicer``) if on the PATH, else this interpreter.

    Inside Slicer ``sys.executable`` is the application itself, not a Python interpreter, so
    the launcher's ``PythonSlicer`` is preferred.
    """
    return shutil.which("PythonSlicer") or sys.executable
