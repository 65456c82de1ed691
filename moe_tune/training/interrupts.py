"""Ctrl-C (SIGINT) and SIGTERM during a run: finish what should not be cut, keep what is done,
and say how to go on.

While the run trains or saves its model, the first signal is only noted: training stops after
the optimizer step in progress with a complete checkpoint (``StopOnInterrupt``), and a model
being saved is saved whole. A second signal, or one in any other phase (loading, evaluating),
stops at once (KeyboardInterrupt); what was complete stays, and ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from transformers import TrainerCallback

from moe_tune.training import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """``with Interrupts() as interrupts:`` handles SIGINT and SIGTERM for the block;
    ``interrupts.requested`` names the first signal noted in a graceful phase."""

    def __init__(self):
        self.requested: str | None = None
        self.graceful = False
        self._saved = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._saved = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None or not self.graceful:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing the step (or the save) in progress, then stopping with a "
              "checkpoint; send it again to stop at once", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def gracefully(self):
        """A phase whose work is finished rather than cut when a first signal comes."""
        self.graceful = True
        try:
            yield self
        finally:
            self.graceful = False


class StopOnInterrupt(TrainerCallback):
    """After an optimizer step during which a signal was noted: save a checkpoint and stop.
    Every rank of a multi-process run stops at the same step."""

    def __init__(self, interrupts: Interrupts):
        self.interrupts = interrupts

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self.interrupts.requested is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
        return control
