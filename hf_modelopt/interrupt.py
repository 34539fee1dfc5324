"""Stopping a run cleanly on SIGINT / SIGTERM: the training step in progress ends, a checkpoint is saved.

While a recipe runs, the first SIGINT (Ctrl-C) or SIGTERM only sets a flag if a Trainer is training: the
`StopOnSignalCallback` of that Trainer then ends training after the current optimizer step with a
checkpoint (`control.should_save`), and `RunInterrupted` is raised once `train()` has returned. Outside
training (loading, evaluating, exporting) there is nothing to save, so the signal raises `RunInterrupted`
at once, as does a second signal. `hf-modelopt run ... --resume` continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from transformers import TrainerCallback

logger = logging.getLogger("hf_modelopt")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; `checkpoint` is the Trainer checkpoint saved on the way out, if any."""

    def __init__(self, signum: int, stage: str | None = None, checkpoint: str | None = None, step: int | None = None):
        self.signum, self.stage, self.checkpoint, self.step = signum, stage, checkpoint, step
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


class _StopState:
    requested: int | None = None  # the signal received while training
    training = False  # a Trainer is inside train(): a signal is deferred to the end of its step


_state = _StopState()


def stop_requested() -> int | None:
    """The signal number if a stop was requested during training, else None."""
    return _state.requested


def _handle(signum, frame):
    if _state.requested is not None or not _state.training:
        raise RunInterrupted(signum)
    _state.requested = signum
    logger.warning("%s received: stopping after the current training step and saving a checkpoint "
                   "(send it again to stop at once)", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_cleanly_on_signals():
    """Within this block SIGINT / SIGTERM stop training at a safe point (see the module docstring).

    Signal handlers can only be set from the main thread; elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    _state.requested, _state.training = None, False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.requested, _state.training = None, False


@contextlib.contextmanager
def training_in_progress():
    """Mark a Trainer's `train()` call: a signal inside it waits for the end of the current step."""
    _state.training = True
    try:
        yield
    finally:
        _state.training = False


class StopOnSignalCallback(TrainerCallback):
    """Ends training after the current optimizer step, with a checkpoint, once a stop signal was received."""

    def on_step_end(self, args, state, control, **kwargs):
        if _state.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
