"""The experiment's progress lines: one per unit and phase, throttled training lines, the time-left estimate."""

from __future__ import annotations

import io

import pytest

from forgetting.harness.progress import ExperimentProgress, Plan, format_duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def progress(interval=60.0, steps=None, evaluations=None):
    clock, stream = Clock(), io.StringIO()
    plan = Plan(steps=steps or {"a": 4, "b": 4}, evaluations=evaluations or {"base": 1, "a": 1, "b": 1})
    return ExperimentProgress(plan, stream=stream, clock=clock, interval=interval), clock, stream


def test_the_estimate_is_steps_left_times_step_time_plus_evaluations_left_times_eval_time():
    p, clock, stream = progress()
    p.evaluating("base", "[base]", "the base model")
    clock.now = 100.0
    p.evaluated("base")  # an evaluation costs 100 s
    p.training("a", "[1/2] a")
    for done in range(1, 5):
        clock.now += 10.0  # every step 10 s (the first one is not timed: it includes loading)
        p.step("a", done, 4, 2.0)
    # left: b's 4 steps x 10 s + a's and b's evaluations x 100 s
    assert p.seconds_left() == pytest.approx(4 * 10 + 2 * 100)
    assert stream.getvalue().splitlines()[-1] == "[1/2] a: training step 4/4, loss 2.0000  [~4 min 00 s left]"


def test_before_anything_is_measured_it_says_so_and_never_guesses():
    p, clock, stream = progress()
    p.evaluating("base", "[base]", "the base model embedded")
    assert stream.getvalue() == "[base]: evaluating the base model embedded  [time left: measuring]\n"
    assert p.seconds_left() is None


def test_training_lines_are_throttled_but_phases_and_the_last_step_always_print():
    p, clock, stream = progress(interval=60.0, steps={"a": 100}, evaluations={"base": 0, "a": 1})
    p.training("a", "[1/1] a")
    for done in range(1, 101):
        clock.now += 1.0
        p.step("a", done, 100, 1.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/1] a: training  [")
    steps = [line.split("step ")[1].split(",")[0] for line in lines[1:]]
    assert steps == ["60/100", "100/100"]  # one line a minute in a log, plus the last step
    p.evaluating("a", "[1/1] a", "final")
    assert stream.getvalue().splitlines()[-1].startswith("[1/1] a: evaluating final")


def test_units_finished_earlier_count_as_done_and_unknown_step_counts_use_the_known_ones():
    p, clock, stream = progress(
        steps={"a": None, "b": None, "c": None}, evaluations={"base": 1, "a": 1, "b": 1, "c": 1}
    )
    p.unit_done("base")
    p.unit_done("a")
    p.eval_seconds.append(50.0)
    p.training("b", "b")
    clock.now = 1.0
    p.step("b", 1, 6, None)
    clock.now = 3.0
    p.step("b", 2, 6, None)  # 2 s per step; c will have b's 6 steps
    assert p.seconds_left() == pytest.approx((4 + 6) * 2 + 2 * 50)


def test_a_terminal_gets_lines_more_often_than_a_log():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert (
        ExperimentProgress(Plan({}, {}), stream=Tty()).interval
        < ExperimentProgress(Plan({}, {}), stream=io.StringIO()).interval
    )


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (61, "1 min 01 s"), (3725, "1 h 02 min")])
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text
