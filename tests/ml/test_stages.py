"""The stage list and the progress arithmetic that the UI and `make demo` share."""

from __future__ import annotations

import pytest

from ml.stages import STAGES, run_fraction, stage_fraction


def test_stages_in_the_papers_order():
    assert STAGES == ("pretext", "mining", "clustering", "selflabel")


@pytest.mark.parametrize(
    ("epoch", "epochs", "step", "steps", "expected"),
    [
        (1, 4, 0, 10, 0.0),  # first report of the first epoch
        (1, 4, 5, 10, 0.125),  # half of the first of four epochs
        (2, 4, 10, 10, 0.5),  # the second epoch's last step
        (4, 4, 10, 10, 1.0),
        (3, 4, None, None, 0.5),  # a stage that reports epochs only
        (None, None, None, None, 0.0),  # nothing reported yet
        (9, 4, 10, 10, 1.0),  # never past the end
    ],
)
def test_stage_fraction(epoch, epochs, step, steps, expected):
    assert stage_fraction(epoch, epochs, step, steps) == pytest.approx(expected)


def test_run_fraction_weighs_the_four_stages_the_same():
    assert run_fraction({}) == 0.0
    assert run_fraction({"pretext": 1.0, "mining": 1.0}) == 0.5
    assert run_fraction({"pretext": 1.0, "mining": 1.0, "clustering": 0.5}) == pytest.approx(0.625)
    assert run_fraction(dict.fromkeys(STAGES, 1.0)) == 1.0
