"""Running ``hrpqct segment`` as a background process for the Slicer module, without Qt.

The Slicer module never segments in its own GUI thread: it writes the input volume to a
temporary file, starts Slicer's Python (``PythonSlicer``) on ``python -m HRpQCTPipeline
segment ... --progress machine`` and polls the process from a ``QTimer``. Everything that
does not need Qt lives here so it runs (and is tested) in plain Python:

* the module's choices (:class:`SegmenterParameters`: units and calibration, model, device)
  with their defaults and validation, read from the module's parameter node
  (:meth:`SegmenterParameters.from_parameter_node`, names in :data:`PARAMETER_NODE_FIELDS`);
* the command line (:func:`build_segment_command`) and the child's environment;
* parsing the child's output: JSON progress lines after :data:`~.progress.PROGRESS_PREFIX`
  and the ``hrpqct segment: error: ...`` line, and turning exit codes (documented in
  :mod:`.cli`) into messages that say what to do (:func:`describe_failure`);
* :class:`BackgroundProcess`, a polled process with an injectable launcher (tests start a real
  process on a small script or on the real command), cancel and wait;
* the Python packages the engine needs (:func:`missing_dependencies`), so the module can offer
  to install them when Apply is first pressed -- never at import time -- and the order of
  that offer (:func:`ensure_dependencies`: ask, then install, with the installers passed in);
* the Apply button's text, state and tooltip (:func:`apply_button_state`), shared by both
  modules.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from HRpQCTCore.errors import ArtefactError, HRpQCTError
from HRpQCTCore.progress import PROGRESS_PREFIX
from HRpQCTCore.scan import Calibration

__all__ = [
    "UNITS_CHOICES",
    "MODEL_CHOICES",
    "DEVICE_CHOICES",
    "CALIBRATED_UNITS",
    "CALIBRATION_RANGES",
    "PARAMETER_NODE_FIELDS",
    "SegmenterParameters",
    "build_segment_command",
    "engine_environment",
    "python_executable",
    "ProgressUpdate",
    "parse_progress_line",
    "parse_error_line",
    "overall_fraction",
    "describe_failure",
    "JobState",
    "BackgroundProcess",
    "popen_launcher",
    "Dependency",
    "ENGINE_DEPENDENCIES",
    "SCANCO_DEPENDENCIES",
    "missing_dependencies",
    "pip_requirements",
    "consent_message",
    "ensure_dependencies",
    "ButtonState",
    "apply_button_state",
]

#: Input units the module offers (``auto``: from the volume's attributes or the value range).
UNITS_CHOICES = ("auto", "hu", "native", "density")
#: Model choices: the bundled model, or a folder written by ``hrpqct train-segmenter``.
MODEL_CHOICES = ("bundled", "folder")
#: Device choices shown to the user; ``gpu`` becomes ``cuda`` (``mps`` on macOS).
DEVICE_CHOICES = ("auto", "cpu", "gpu")

#: File in a model folder that marks it as written by the engine (see segmentation.model).
MODEL_METADATA_FILE = "hrpqct_model.json"


# ------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------
#: Units whose conversion to HU needs the scanner's calibration constants.
CALIBRATED_UNITS = ("native", "density")
_DEFAULT_CALIBRATION = Calibration()
#: Accepted range of each calibration constant (the panel's spin boxes use the same limits).
#: Wide on purpose: they catch typing slips (a zero, a sign), not unusual scanners.
CALIBRATION_RANGES: dict[str, tuple[float, float]] = {
    "mu_scaling": (1.0, 1.0e6),
    "mu_water": (1.0e-3, 10.0),
    "density_slope": (1.0e-3, 1.0e5),
    "density_intercept": (-1.0e5, 1.0e5),
}
#: The command-line option of each calibration constant (``commands._common``).
_CALIBRATION_OPTIONS = {"mu_scaling": "--mu-scaling", "mu_water": "--mu-water",
                        "density_slope": "--density-slope",
                        "density_intercept": "--density-intercept"}
#: Parameter-node attribute (the module's ``HRpQCTSegmenterParameterNode``) -> field of
#: :class:`SegmenterParameters`. The module's parameter node must declare every one of them.
PARAMETER_NODE_FIELDS: dict[str, str] = {
    "inputUnits": "units",
    "model": "model",
    "modelFolder": "model_folder",
    "device": "device",
    "muScaling": "mu_scaling",
    "muWater": "mu_water",
    "densitySlope": "density_slope",
    "densityIntercept": "density_intercept",
}


@dataclass
class SegmenterParameters:
    """The user's choices for one segmentation run (the parameter node mirrors these).

    Attributes
    ----------
    units:
        Units of the input volume's voxels, one of :data:`UNITS_CHOICES`.
    model:
        ``"bundled"`` or ``"folder"`` (:data:`MODEL_CHOICES`).
    model_folder:
        The user's model folder when ``model == "folder"``.
    device:
        One of :data:`DEVICE_CHOICES`.
    mu_scaling, mu_water, density_slope, density_intercept:
        The scanner's calibration (see :class:`~.scan.Calibration`), used only when ``units``
        is ``native`` or ``density`` (:data:`CALIBRATED_UNITS`). Defaults: Scanco XtremeCT II
        values, which the user should replace with those of the scan's header or the
        scanner's calibration report.
    """

    units: str = "auto"
    model: str = "bundled"
    model_folder: str = ""
    device: str = "auto"
    mu_scaling: float = _DEFAULT_CALIBRATION.mu_scaling
    mu_water: float = _DEFAULT_CALIBRATION.mu_water
    density_slope: float = _DEFAULT_CALIBRATION.density_slope
    density_intercept: float = _DEFAULT_CALIBRATION.density_intercept

    @classmethod
    def from_parameter_node(cls, parameter_node: Any) -> SegmenterParameters:
        """The choices held by the module's parameter node (attributes of
        :data:`PARAMETER_NODE_FIELDS`); works with any object having those attributes."""
        values = {name: getattr(parameter_node, attribute)
                  for attribute, name in PARAMETER_NODE_FIELDS.items()}
        values["model_folder"] = values["model_folder"] or ""
        return cls(**values)

    @property
    def needs_calibration(self) -> bool:
        """Whether the units need the calibration constants to be converted to HU."""
        return self.units in CALIBRATED_UNITS

    def calibration(self) -> Calibration | None:
        """The user's calibration when the units need one, else None.

        Raises
        ------
        HRpQCTError
            When a constant is out of :data:`CALIBRATION_RANGES` or not a number.
        """
        if not self.needs_calibration:
            return None
        found = self._calibration_problems()
        if found:
            raise HRpQCTError(" ".join(found))
        return Calibration(**{name: float(getattr(self, name)) for name in CALIBRATION_RANGES},
                           source="user")

    def _calibration_problems(self) -> list[str]:
        found = []
        for name, (low, high) in CALIBRATION_RANGES.items():
            value = getattr(self, name)
            try:
                ok = math.isfinite(float(value)) and low <= float(value) <= high
            except (TypeError, ValueError):
                ok = False
            if not ok:
                found.append(f"Calibration {name} = {value!r} is outside {low:g}..{high:g}: "
                             "enter the value from the scan's header or the scanner's "
                             "calibration report.")
        return found

    def problems(self) -> list[str]:
        """What is wrong with the choices, each with what to do (empty when valid)."""
        found = []
        if self.units not in UNITS_CHOICES:
            found.append(f"Unknown input units {self.units!r}: choose one of "
                         f"{', '.join(UNITS_CHOICES)}.")
        elif self.needs_calibration:
            found += self._calibration_problems()
        if self.model not in MODEL_CHOICES:
            found.append(f"Unknown model choice {self.model!r}: choose bundled or folder.")
        elif self.model == "folder":
            folder = Path(self.model_folder) if self.model_folder else None
            if folder is None:
                found.append("Choose the folder holding your trained model, or select the "
                             "bundled model.")
            elif not folder.is_dir():
                found.append(f"Model folder {folder} does not exist: choose a folder written "
                             "by 'hrpqct train-segmenter'.")
            elif not (folder / MODEL_METADATA_FILE).is_file():
                found.append(f"{folder} has no {MODEL_METADATA_FILE}, so it is not a model "
                             "folder written by 'hrpqct train-segmenter': choose that folder.")
        if self.device not in DEVICE_CHOICES:
            found.append(f"Unknown device {self.device!r}: choose auto, cpu or gpu.")
        return found

    def validate(self) -> None:
        """Raise :class:`~.errors.HRpQCTError` listing every problem, if any."""
        found = self.problems()
        if found:
            error = ArtefactError if any("model" in p.lower() for p in found) else HRpQCTError
            raise error(" ".join(found))

    def device_argument(self, platform: str = sys.platform) -> str:
        """The ``--device`` value for the command line."""
        if self.device == "gpu":
            return "mps" if platform == "darwin" else "cuda"
        return self.device


# ------------------------------------------------------------------------------------------
# command line and environment
# ------------------------------------------------------------------------------------------
def build_segment_command(python: str | os.PathLike, input_path: str | os.PathLike,
                          output_path: str | os.PathLike, parameters: SegmenterParameters,
                          *, qc_json: str | os.PathLike | None = None) -> list[str]:
    """The ``hrpqct segment`` command line run in the background process.

    Parameters
    ----------
    python:
        Interpreter with the engine's dependencies (Slicer's ``PythonSlicer``).
    input_path:
        The input volume written by the module (NRRD).
    output_path:
        Where the command writes the 7-region ``.seg.nrrd``.
    parameters:
        The user's choices (validated here). With native or density units the four
        calibration constants are passed on (``--mu-scaling=8192.0`` ...), written so they
        read back exactly.
    qc_json:
        Optional per-slice confidence report.
    """
    parameters.validate()
    command = [str(python), "-m", "HRpQCTPipeline", "segment", str(input_path),
               str(output_path), "--progress", "machine", "--units", parameters.units,
               "--device", parameters.device_argument(), "--overwrite"]
    calibration = parameters.calibration()
    if calibration is not None:  # "--option=value": a negative intercept is no option name
        for name, option in _CALIBRATION_OPTIONS.items():
            command.append(f"{option}={float(getattr(calibration, name))!r}")
    if parameters.model == "folder":
        command += ["--model", str(parameters.model_folder)]
    if qc_json is not None:
        command += ["--qc-json", str(qc_json)]
    return command


def engine_environment(engine_parent_dir: str | os.PathLike,
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the child: the engine importable, output unbuffered, UTF-8.

    ``engine_parent_dir`` is the folder holding the engine packages (the
    module's folder in Slicer); it is put first on ``PYTHONPATH``.
    """
    env = dict(os.environ if base is None else base)
    parts = [str(engine_parent_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
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


# ------------------------------------------------------------------------------------------
# parsing the child's output
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProgressUpdate:
    """One machine progress line: ``done`` of ``total`` units of ``stage``."""

    stage: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        """Fraction of the stage done, in [0, 1]."""
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0


def parse_progress_line(line: str) -> ProgressUpdate | None:
    """The progress in ``line``, or None if it is not a (well-formed) progress line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        payload = json.loads(line[len(PROGRESS_PREFIX):])
        return ProgressUpdate(stage=str(payload["stage"]), done=int(payload["done"]),
                              total=int(payload["total"]))
    except (ValueError, KeyError, TypeError):
        return None


def parse_error_line(line: str) -> str | None:
    """The message of an ``hrpqct <command>: error: <message>`` line, else None."""
    head, sep, message = line.partition(": error: ")
    if sep and head.startswith("hrpqct"):
        return message.strip()
    return None


#: Share of the whole run taken by each stage (start, end); unknown stages keep the bar.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "read": (0.00, 0.03),
    "convert": (0.03, 0.05),
    "segmenting slices": (0.05, 0.80),
    "post-processing": (0.80, 0.88),
    "soft-tissue subdivision": (0.88, 0.97),
}
#: Where the bar stands while the module loads the result into the scene.
LOADING_SPAN = (0.97, 1.0)


def overall_fraction(update: ProgressUpdate, previous: float = 0.0) -> float:
    """Fraction of the whole run after ``update``; never goes backwards."""
    span = STAGE_SPANS.get(update.stage)
    if span is None:
        return previous
    start, end = span
    return max(previous, start + (end - start) * update.fraction)


#: What to do, by exit code of the ``hrpqct`` command (see :mod:`.cli`).
EXIT_CODE_ADVICE: dict[int, str] = {
    1: "This is a bug in the segmenter: please report it with the log shown below.",
    2: "Check the module's settings (model, device) and try again.",
    3: "The input could not be read: check that the volume is a complete 3D scan.",
    4: "The input volume is not a usable HR-pQCT scan (it must be a 3D stack with finite "
       "values); load the complete scan.",
    5: "Choose the input units that match the volume (HU, native or density) and, for native "
       "or density, enter the scanner's calibration constants. A Scanco .AIM/.ISQ loaded by "
       "drag and drop is already in HU.",
    6: "The segmentation model is missing or damaged: choose a model folder written by "
       "'hrpqct train-segmenter', or reinstall the extension for the bundled model.",
}
CANCEL_EXIT_CODE = 130
#: Exit codes meaning the child was stopped by a signal (POSIX: negative; 130 = SIGINT).
_KILLED_BY_MEMORY = (-9, 137)


def describe_failure(exit_code: int, error_message: str | None,
                     stderr_tail: Sequence[str] = ()) -> str:
    """A message for the GUI: what went wrong and what to do.

    Parameters
    ----------
    exit_code:
        The child's exit code.
    error_message:
        Its ``hrpqct segment: error:`` message, if it printed one.
    stderr_tail:
        Its last stderr lines, shown when there is no error message (e.g. a crash).
    """
    if exit_code in _KILLED_BY_MEMORY:
        return ("The segmentation process was killed by the system, most often because the "
                "computer ran out of memory. Close other programs, or choose the CPU device "
                "if the GPU is small, and try again.")
    advice = EXIT_CODE_ADVICE.get(exit_code, EXIT_CODE_ADVICE[1])
    if error_message:
        return f"{error_message}\n\n{advice}"
    detail = "\n".join(line for line in stderr_tail if line.strip())[-1500:]
    if exit_code == 1 and "ModuleNotFoundError" in detail:
        advice = ("A Python package the segmenter needs is missing: press Apply again and "
                  "accept installing the dependencies.")
    text = f"The segmentation process failed (exit code {exit_code}). {advice}"
    return f"{text}\n\n{detail}" if detail else text


# ------------------------------------------------------------------------------------------
# background process
# ------------------------------------------------------------------------------------------
class ProcessLike(Protocol):
    """What :class:`BackgroundProcess` needs of a started process (``subprocess.Popen``)."""

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
    """Start ``command`` with text pipes (and no console window on Windows)."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                            errors="replace", bufsize=1, env=dict(env), creationflags=flags)


class JobState:
    """States of a :class:`BackgroundProcess` (plain strings, easy to show and to log)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class _Output:
    """What the child printed, drained from the reader threads' queue."""

    progress: ProgressUpdate | None = None
    error_message: str | None = None
    log: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


class BackgroundProcess:
    """A child process whose output is read by threads and collected on :meth:`poll`.

    The GUI calls :meth:`poll` from a timer: it never blocks, so Slicer stays responsive.
    Scripts and tests call :meth:`wait`.

    Parameters
    ----------
    command, env:
        What to run.
    launcher:
        ``launcher(command, env) -> process``; :func:`popen_launcher` by default.
    on_log:
        Called (from :meth:`poll`, in the caller's thread) with each non-progress line.
    """

    #: Seconds :meth:`cancel` waits after terminating before it kills.
    KILL_AFTER_S = 5.0

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None,
                 launcher: Launcher = popen_launcher,
                 on_log: Callable[[str], None] | None = None) -> None:
        self.command = list(command)
        self._on_log = on_log
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._output = _Output()
        self._cancel_requested = False
        self.state = JobState.RUNNING
        self.exit_code: int | None = None
        self.fraction = 0.0
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._process = launcher(self.command, dict(os.environ if env is None else env))
        self._readers = [self._start_reader(self._process.stdout, "stdout"),
                         self._start_reader(self._process.stderr, "stderr")]

    def _start_reader(self, stream: Iterable[str] | None, name: str) -> threading.Thread | None:
        if stream is None:
            return None

        def read() -> None:
            try:
                for line in stream:
                    self._lines.put((name, line.rstrip("\r\n")))
            finally:
                self._lines.put((name, None))  # end of this stream

        thread = threading.Thread(target=read, name=f"hrpqct-{name}", daemon=True)
        thread.start()
        return thread

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
            if line is None:
                continue
            update = parse_progress_line(line)
            if update is not None:
                self._output.progress = update
                self.fraction = overall_fraction(update, self.fraction)
                continue
            message = parse_error_line(line)
            if message is not None:
                self._output.error_message = message
            self._output.log.append(line)
            if name == "stderr":
                self._output.stderr_tail = [*self._output.stderr_tail, line][-40:]
            if self._on_log is not None:
                self._on_log(line)

    # -- control ---------------------------------------------------------------------------
    def poll(self) -> str:
        """Collect new output and update :attr:`state`; never blocks."""
        self._drain()
        if self.state in JobState.FINISHED:
            return self.state
        code = self._process.poll()
        if code is None:
            return self.state
        for reader in self._readers:  # the pipes are closed: the readers end promptly
            if reader is not None:
                reader.join(timeout=5.0)
        self._drain()
        self.exit_code = code
        self.finished_at = time.monotonic()
        if self._cancel_requested or code == CANCEL_EXIT_CODE:
            self.state = JobState.CANCELLED
        elif code == 0:
            self.state = JobState.SUCCEEDED
        else:
            self.state = JobState.FAILED
        return self.state

    @property
    def seconds(self) -> float:
        """Seconds since the process started."""
        return (self.finished_at or time.monotonic()) - self.started_at

    def cancel(self) -> None:
        """Stop the child (terminate, then kill if it does not exit)."""
        if self.state in JobState.FINISHED:
            return
        self._cancel_requested = True
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=self.KILL_AFTER_S)
        self.poll()

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.05) -> str:
        """Poll until the child ends; on timeout cancel it and raise ``TimeoutError``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll() not in JobState.FINISHED:
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
                                self._output.error_message, self._output.stderr_tail)


# ------------------------------------------------------------------------------------------
# dependencies
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dependency:
    """A Python package the engine imports.

    Attributes
    ----------
    module:
        Import name (checked with ``importlib.util.find_spec``, without importing).
    requirement:
        pip requirement string.
    installer:
        ``"pytorch"`` (Slicer's PyTorch extension picks the build for the GPU) or ``"pip"``.
    optional:
        Only speeds things up; never installed without being asked for.
    """

    module: str
    requirement: str
    installer: str = "pip"
    optional: bool = False


#: What ``hrpqct segment`` imports besides Slicer's own packages (numpy, scipy, SimpleITK,
#: which Slicer bundles, are listed so plain-Python installs are checked too).
ENGINE_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("torch", "torch>=2.1", installer="pytorch"),
    Dependency("transformers", "transformers>=4.40,<6"),
    Dependency("safetensors", "safetensors>=0.4"),
    Dependency("numpy", "numpy>=1.24"),
    Dependency("scipy", "scipy>=1.10"),
    Dependency("SimpleITK", "SimpleITK>=2.2"),
    Dependency("onnxruntime", "onnxruntime>=1.17", optional=True),
)
#: What reading Scanco ``.AIM``/``.ISQ`` files needs.
SCANCO_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("py_aimio", "aimio-py"),
)


def missing_dependencies(dependencies: Iterable[Dependency] = ENGINE_DEPENDENCIES, *,
                         include_optional: bool = False,
                         find_spec: Callable[[str], Any] = importlib.util.find_spec
                         ) -> list[Dependency]:
    """The dependencies that cannot be imported (found without importing them)."""
    missing = []
    for dependency in dependencies:
        if dependency.optional and not include_optional:
            continue
        try:
            found = find_spec(dependency.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dependency)
    return missing


def pip_requirements(dependencies: Iterable[Dependency]) -> list[str]:
    """pip requirement strings of the dependencies pip installs (not torch)."""
    return [d.requirement for d in dependencies if d.installer == "pip"]


def consent_message(missing: Sequence[Dependency], requester: str = "The HR-pQCT Segmenter"
                    ) -> str:
    """The question asked before installing ``missing`` (what, from where, how long)."""
    names = ", ".join(d.requirement for d in missing)
    slow = (" PyTorch comes through Slicer's PyTorch extension and can take several minutes."
            if any(d.installer == "pytorch" for d in missing) else "")
    return (f"{requester} needs these Python packages, which are not installed: {names}.\n\n"
            "Install them now? They are downloaded from the Python Package Index." + slow
            + " Slicer may ask to be restarted afterwards.")


def ensure_dependencies(dependencies: Iterable[Dependency], *,
                        confirm: Callable[[str], bool],
                        install_torch: Callable[[], None],
                        pip_install: Callable[[list[str]], None],
                        requester: str = "The HR-pQCT Segmenter",
                        find_spec: Callable[[str], Any] = importlib.util.find_spec) -> bool:
    """Offer to install the missing dependencies; True when all are present afterwards.

    Nothing is installed without ``confirm(message)`` returning True (the module shows a
    dialog; scripts and self-tests pass ``lambda message: True``). torch goes through
    ``install_torch`` (Slicer's PyTorch extension picks the build for the GPU), the rest
    through ``pip_install(requirements)``.

    Returns
    -------
    bool
        False when the user declined (nothing was installed).

    Raises
    ------
    HRpQCTError
        When packages are still missing after installing.
    """
    dependencies = list(dependencies)
    missing = missing_dependencies(dependencies, find_spec=find_spec)
    if not missing:
        return True
    if not confirm(consent_message(missing, requester)):
        return False
    if any(d.installer == "pytorch" for d in missing):
        install_torch()
    requirements = pip_requirements(missing)
    if requirements:
        pip_install(requirements)
    importlib.invalidate_caches()
    still = missing_dependencies(dependencies, find_spec=find_spec)
    if still:
        raise HRpQCTError(
            "Installing " + ", ".join(d.requirement for d in still) + " did not succeed. "
            "Restart Slicer and press Apply again; if it keeps failing, see the Python "
            "console for pip's message.")
    return True


# ------------------------------------------------------------------------------------------
# the Apply button
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ButtonState:
    """Text, enabled state and tooltip of a module's Apply button."""

    text: str
    enabled: bool
    tooltip: str


def apply_button_state(problems: Sequence[str], *, running: bool, ready_tooltip: str,
                       cancel_tooltip: str) -> ButtonState:
    """Apply while idle (disabled, with the problems as tooltip, until the choices are
    valid), Cancel while a run is going."""
    if running:
        return ButtonState("Cancel", True, cancel_tooltip)
    if problems:
        return ButtonState("Apply", False, " ".join(problems))
    return ButtonState("Apply", True, ready_tooltip)
