"""Progress of a whole experiment: one line per unit and phase, with the time left for everything.

An experiment is minutes to hours of silent work (training steps, evaluations). `ExperimentProgress` prints a
line when a phase starts (`[2/6] lora__seed0: training`, `... evaluating final`) and, while a unit trains,
at most one line per `interval` seconds (a few seconds on a terminal, a minute in a log file, so that logs that
are not a terminal are not flooded). Each line ends with the estimated time left for the whole experiment:

    remaining training steps x seconds per step so far  +  remaining evaluations x seconds per evaluation so far

with the base model's evaluation as the first measure of an evaluation's cost. Before anything has been
measured the line says so instead of guessing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

TERMINAL_INTERVAL = 5.0  # seconds between training lines on a terminal
LOG_INTERVAL = 60.0  # ... and when the output is a file or a pipe


@dataclass
class Plan:
    """What is left to do: training steps per unit (None: not known before the unit starts) and evaluations."""

    steps: dict[str, int | None]  # unit id -> optimizer steps
    evaluations: dict[str, int]  # unit id (or "base") -> model evaluations (final + WiSE-FT points)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


@dataclass
class ExperimentProgress:
    plan: Plan
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    clock: Callable[[], float] = time.monotonic
    interval: float | None = None  # None: by whether the stream is a terminal

    def __post_init__(self):
        if self.interval is None:
            self.interval = TERMINAL_INTERVAL if getattr(self.stream, "isatty", lambda: False)() else LOG_INTERVAL
        self.units = list(self.plan.steps)
        self.steps_done: dict[str, int] = {}
        self.evals_done: dict[str, int] = {}
        self.step_seconds: list[float] = []  # measured seconds per training step (one entry per step)
        self.eval_seconds: list[float] = []  # measured seconds per evaluation
        self._label = ""
        self._last_line = -float("inf")
        self._last_step_at: float | None = None
        self._eval_started: float | None = None

    # ---- what the experiment reports
    def unit_done(self, unit_id: str) -> None:
        """A unit finished earlier (resume) or now: nothing of it is left."""
        steps = self.plan.steps.get(unit_id)
        self.steps_done[unit_id] = steps or 0
        self.plan.steps[unit_id] = steps or 0
        self.evals_done[unit_id] = self.plan.evaluations.get(unit_id, 0)

    def training(self, unit_id: str, label: str) -> None:
        self._label = label
        self._last_step_at = None
        self._line(f"{label}: training", force=True)

    def step(self, unit_id: str, done: int, total: int, loss: float | None) -> None:
        """After optimizer step `done` of `total` (resumed runs start past 0)."""
        now = self.clock()
        if self._last_step_at is not None:
            self.step_seconds.append(now - self._last_step_at)
        self._last_step_at = now
        self.plan.steps[unit_id] = total
        self.steps_done[unit_id] = done
        loss_text = f", loss {loss:.4f}" if loss is not None else ""
        self._line(f"{self._label}: training step {done}/{total}{loss_text}", force=done == total)

    def evaluating(self, unit_id: str, label: str, what: str) -> None:
        self._label = label
        self._eval_started = self.clock()
        self._line(f"{label}: evaluating {what}", force=True)

    def evaluated(self, unit_id: str) -> None:
        if self._eval_started is not None:
            self.eval_seconds.append(self.clock() - self._eval_started)
            self._eval_started = None
        self.evals_done[unit_id] = self.evals_done.get(unit_id, 0) + 1

    # ---- the estimate
    def seconds_left(self) -> float | None:
        """Estimated seconds until the experiment ends; None until a step and an evaluation were measured."""
        if not self.step_seconds or not self.eval_seconds:
            return None
        known = [s for s in self.plan.steps.values() if s]
        typical_steps = sum(known) / len(known) if known else 0
        steps_left = sum(
            (total if total is not None else typical_steps) - self.steps_done.get(unit, 0)
            for unit, total in self.plan.steps.items()
        )
        evals_left = sum(count - self.evals_done.get(unit, 0) for unit, count in self.plan.evaluations.items())
        per_step = sum(self.step_seconds) / len(self.step_seconds)
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds)
        return max(0.0, steps_left * per_step + evals_left * per_eval)

    def _line(self, text: str, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_line < self.interval:
            return
        self._last_line = now
        left = self.seconds_left()
        estimate = f"~{format_duration(left)} left" if left is not None else "time left: measuring"
        print(f"{text}  [{estimate}]", file=self.stream, flush=True)
