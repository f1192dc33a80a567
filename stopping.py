"""What stops a run without losing it: stop signals and non-finite losses.

- `StopSignals`: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only raise a flag; the loop
  finishes its step, saves, and exits with 128 + signal number. Further signals while it saves and
  exits are reported and ignored, so nothing can cut a checkpoint write short (and if SIGKILL does,
  the write is atomic: latest.pt still names the previous complete checkpoint).
- `FiniteWatch`: remembers on the device the first step whose losses were NaN/Inf, so the loop
  checks every step without a host sync, and syncs only when it logs or is about to save;
  `params_finite` checks the weights before a save.
- `Interrupted`, `Diverged`: how the loop ends early (main.py prints the command that continues).
"""
import signal
import sys
import threading

import torch


class Interrupted(Exception):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self):
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Diverged(Exception):
    """A loss went NaN/Inf; the message names the step and the last good checkpoint."""


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.signum:` save and leave. Handlers are restored on
    exit; outside the main thread (a notebook's worker thread) signals can't be caught: no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  f"(wait for it; more signals are ignored)", file=sys.stderr, flush=True)
        else:
            print(f"{signal.Signals(signum).name} again: already stopping, saving first; please wait",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        if self.signum is None:  # once stopping, keep ignoring: a late Ctrl-C must not turn the
            for s, handler in self._previous.items():  # clean exit into a traceback
                signal.signal(s, handler)
            self._previous = {}
        return False


class FiniteWatch:
    """first_bad: the first step whose summed losses were not finite, or -1; kept on the device."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step, losses):
        total = sum(v.detach().float() for v in losses.values())
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(total)
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step), self.first_bad)

    def bad_step(self):
        """The first non-finite step (one host sync), or None."""
        step = int(self.first_bad.item())
        return step if step >= 0 else None


def params_finite(*modules):
    """True when every parameter and buffer is finite (one host sync)."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())
