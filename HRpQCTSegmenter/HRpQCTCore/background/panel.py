"""The run behaviour both module panels share, without Qt: Apply/Cancel, polling, status.

A module widget owns its ``QTimer`` and its Qt widgets; it hands :class:`RunPanel` the few
calls that touch them (:class:`PanelView`) and a function that starts a run. The panel then
does the rest the same way in both modules: Apply starts a run and the timer, each tick polls
the run and shows its progress and status, Cancel stops it, and the end of the run shows the
result, the cancellation or the error (status label and dialog, with the run's log as
details). The Apply button's text, state and tooltip come from :func:`apply_button_state`.

A run is anything with the :class:`PanelRun` methods: the Segmenter's ``SegmentationRun``
(a background process) and the Radiomics module's ``RadiomicsRun`` (one too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from HRpQCTCore.background.process import JobState
from HRpQCTCore.errors import CancelledError

__all__ = [
    "ERROR_STYLE",
    "status_style",
    "ButtonState",
    "apply_button_state",
    "PanelRun",
    "PanelView",
    "RunPanel",
]

#: Style sheet of the status label while it shows an error.
ERROR_STYLE = "color: #c0392b;"


def status_style(error: bool) -> str:
    """Style sheet of the status label: red for an error, the default otherwise."""
    return ERROR_STYLE if error else ""


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


class PanelRun(Protocol):
    """What :class:`RunPanel` needs of a started run."""

    message: str

    @property
    def fraction(self) -> float: ...

    def poll(self) -> JobState: ...

    def status_text(self) -> str: ...

    def cancel(self) -> None: ...

    def log_lines(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class PanelView:
    """The widget's calls that touch Qt (the module file binds them to its widgets).

    Attributes
    ----------
    set_status:
        ``set_status(text, error)``: the status label (red when ``error``).
    set_progress:
        ``set_progress(percent)``: the progress bar, 0..100.
    show_error:
        ``show_error(message, details)``: an error dialog; ``details`` is the run's log
        (may be empty).
    start_timer, stop_timer:
        The ``QTimer`` that calls :meth:`RunPanel.poll`.
    refresh:
        Update the enabled state of the widgets (and the Apply button) after a run starts
        or ends.
    """

    set_status: Callable[[str, bool], None]
    set_progress: Callable[[int], None]
    show_error: Callable[[str, str], None]
    start_timer: Callable[[], None]
    stop_timer: Callable[[], None]
    refresh: Callable[[], None]


class RunPanel:
    """One run at a time for a module panel (see module docstring).

    Parameters
    ----------
    view:
        The widget's calls.
    on_success:
        Called with the finished run after it succeeded (after the status shows
        ``run.message``): put the result into the panel.
    cancelling_text:
        Status shown from Cancel until the run has stopped.
    """

    def __init__(self, view: PanelView, *, on_success: Callable[[PanelRun], None],
                 cancelling_text: str = "Cancelling...") -> None:
        self.view = view
        self._on_success = on_success
        self._cancelling_text = cancelling_text
        self._run: PanelRun | None = None
        self._cancelling = False

    @property
    def run(self) -> PanelRun | None:
        """The run going on now, if any."""
        return self._run

    @property
    def running(self) -> bool:
        """Whether a run is going on (the Apply button reads Cancel)."""
        return self._run is not None

    def button_state(self, problems: Sequence[str], *, ready_tooltip: str,
                     cancel_tooltip: str) -> ButtonState:
        """:func:`apply_button_state` for the panel's current run."""
        return apply_button_state(problems, running=self.running, ready_tooltip=ready_tooltip,
                                  cancel_tooltip=cancel_tooltip)

    # -- the Apply button ------------------------------------------------------------------
    def apply(self, start_run: Callable[[], PanelRun | None], *,
              first_status: Callable[[PanelRun], str] | None = None) -> None:
        """The Apply button: cancel the run going on, or :meth:`start` one."""
        if self.running:
            self.cancel()
        else:
            self.start(start_run, first_status=first_status)

    def start(self, start_run: Callable[[], PanelRun | None], *,
              first_status: Callable[[PanelRun], str] | None = None) -> bool:
        """Start a run and the timer; True when a run started.

        ``start_run()`` returns the started run, or None when it decided not to start (it has
        then set the status itself). A :class:`~HRpQCTCore.errors.CancelledError` it raises
        (the user said no to a question) is shown as a plain status; any other error as an
        error with its message. ``first_status(run)`` is the status shown at the start
        (default: the run's status text).
        """
        if self.running:
            return False
        self.view.set_progress(0)
        try:
            run = start_run()
        except CancelledError as exc:
            self.view.set_status(str(exc), False)
            return False
        except Exception as exc:  # every failure to start is shown, with what to do
            self._show_error(str(exc), "")
            return False
        if run is None:
            return False
        self._run, self._cancelling = run, False
        self.view.set_status((first_status or _status_text)(run), False)
        self.view.start_timer()
        self.view.refresh()
        return True

    def cancel(self) -> None:
        """Ask the run to stop; the next :meth:`poll` (called here too) shows the outcome."""
        if self._run is None:
            return
        self._cancelling = True
        self.view.set_status(self._cancelling_text, False)
        try:
            self._run.cancel()
        except Exception as exc:  # a run that cannot be stopped must still leave the panel
            self._end()
            self._show_error(f"The run could not be cancelled: {exc}", "")
            self.view.refresh()
            return
        self.poll()

    # -- the timer -------------------------------------------------------------------------
    def poll(self) -> JobState | None:
        """The timer's tick: progress and status while the run goes, the outcome at its end.

        Returns the run's state (None when no run was going).
        """
        run = self._run
        if run is None:
            self.view.stop_timer()
            return None
        try:
            state = run.poll()
        except Exception as exc:  # never raise into the timer: it would repeat every tick
            self._end()
            self._show_error(f"The run failed unexpectedly: {exc}", _log_text(run))
            self.view.refresh()
            return JobState.FAILED
        self.view.set_progress(round(100 * run.fraction))
        if not state.finished:
            self.view.set_status(self._cancelling_text if self._cancelling
                                 else run.status_text(), False)
            return state
        self._end()
        if state == JobState.SUCCEEDED:
            self._succeeded(run)
        elif state == JobState.CANCELLED:
            self.view.set_progress(0)
            self.view.set_status(run.message, False)
        else:
            self._show_error(run.message, _log_text(run))
        self.view.refresh()
        return state

    def _succeeded(self, run: PanelRun) -> None:
        self.view.set_status(run.message, False)
        try:
            self._on_success(run)
        except Exception as exc:  # the result is in the scene; say what did not work
            self._show_error(f"The run finished, but showing its result failed: {exc}", "")

    def _end(self) -> None:
        self.view.stop_timer()
        self._run, self._cancelling = None, False

    def _show_error(self, message: str, details: str) -> None:
        self.view.set_status(message, True)
        self.view.show_error(message, details)


def _status_text(run: PanelRun) -> str:
    return run.status_text()


def _log_text(run: PanelRun) -> str:
    return "\n".join(run.log_lines())
