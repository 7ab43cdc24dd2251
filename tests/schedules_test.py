import re

import pytest

from keras_raptr import schedules
from keras_raptr.schedules import Stage


def test_parse_spec_equal_stages_remainder_to_last():
    stages = schedules.parse_spec("6-8-10-12", total_steps=1003)
    assert [s.path_length for s in stages] == [6, 8, 10, 12]
    assert [s.steps for s in stages] == [250, 250, 250, 253]


def test_parse_spec_stage_lengths_in_steps_or_fractions():
    steps = lambda lengths, total: [
        s.steps for s in schedules.parse_spec("6-8-10-12", total, stage_lengths=lengths)
    ]
    assert steps((100, 100, 100, 700), 1000) == [100, 100, 100, 700]
    assert steps((0.2, 0.2, 0.2, 0.4), 1000) == [200, 200, 200, 400]
    # floor for each stage, the rest to the last.
    assert steps((0.25, 0.25, 0.25, 0.25), 1003) == [250, 250, 250, 253]
    assert steps((1 / 3, 1 / 3, 1 / 6, 1 / 6), 10) == [3, 3, 1, 3]


@pytest.mark.parametrize(
    "lengths, message",
    [
        ((0.5, 0.5), "has 2 entries but '6-8-10-12' has 4 stages"),
        ((100, 100, 100, 100), "must add up to total_steps=1000"),
        ((0.2, 0.2, 0.2, 0.2), "must add up to 1"),
        ((0.0, 0.2, 0.4, 0.4), "must be positive numbers"),
        ((0.0001, 0.3999, 0.3, 0.3), "leave a stage with no step"),
        ("0.25,0.25", "must be a sequence with one length per stage"),
    ],
)
def test_parse_spec_bad_stage_lengths(lengths, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.parse_spec("6-8-10-12", 1000, stage_lengths=lengths)


def test_stage_index_at_boundaries():
    stages = [Stage(2, 5), Stage(4, 5), Stage(6, 5)]
    assert [schedules.stage_index(stages, t) for t in (0, 4, 5, 9, 10, 14, 15, 99)] == [
        0, 0, 1, 1, 2, 2, 3, 3
    ]
    assert schedules.path_length_at(stages, 15, num_blocks=8) == 8.0
    assert schedules.path_length_at(stages, 7, num_blocks=8) == 4.0


def test_compute_fraction_of_paper_schedule():
    stages = schedules.parse_spec("6-8-10-12", total_steps=400)
    assert schedules.compute_fraction(stages, 12) == pytest.approx(0.75)
    # Subset sampling counts round(path_length) blocks.
    stages = [Stage(2.4, 10), Stage(4, 10)]
    assert schedules.compute_fraction(stages, 4, "subset") == pytest.approx(0.75)
    assert schedules.compute_fraction(stages, 4, "bernoulli") == pytest.approx(0.8)


def test_keep_probability_matches_paper_definition():
    # 12 blocks, first and last fixed, expected path length 6: 4 of 10.
    assert schedules.keep_probability(6, 12, 2) == pytest.approx(0.4)
    assert schedules.keep_probability(12, 12, 2) == 1.0


def test_normalize_fixed_blocks():
    assert schedules.normalize_fixed_blocks((0, -1), 12) == (0, 11)
    assert schedules.normalize_fixed_blocks((), 12) == ()


@pytest.mark.parametrize(
    "path_length, steps, match",
    [
        (0, 10, "positive number of blocks"),
        (-1, 10, "positive number of blocks"),
        (float("nan"), 10, "positive number of blocks"),
        ("6", 10, "number of blocks"),
        (6, 0, "positive integer"),
        (6, 1.5, "positive integer"),
        (6, -3, "positive integer"),
    ],
)
def test_bad_stage(path_length, steps, match):
    with pytest.raises(ValueError, match=match):
        Stage(path_length, steps)


@pytest.mark.parametrize(
    "spec, total, match",
    [
        ("6-x-12", 30, "'x' is not a positive number"),
        ("", 30, "is not a positive number"),
        ("6--12", 30, "is not a positive number"),
        ("6-0-12", 30, "'0' is not a positive number"),
        ("6-8-12", 2, "at least 3"),
        (["6", "8"], 30, "must be a string"),
    ],
)
def test_bad_spec(spec, total, match):
    with pytest.raises(ValueError, match=match):
        schedules.parse_spec(spec, total)


@pytest.mark.parametrize(
    "fixed, match",
    [
        ((0, 12), "index 12 is out of range"),
        ((-13,), "index -13 is out of range"),
        ((0, 0), "names the same block twice"),
        ((11, -1), "names the same block twice"),
        ((0.5,), "integer block indices"),
    ],
)
def test_bad_fixed_blocks(fixed, match):
    with pytest.raises(ValueError, match=match):
        schedules.normalize_fixed_blocks(fixed, 12)


def test_check_stages_bounds():
    with pytest.raises(ValueError, match="more than the model's 12 blocks"):
        schedules.check_stages([Stage(13, 5)], 12, 2)
    with pytest.raises(ValueError, match="fewer than the 2 fixed blocks"):
        schedules.check_stages([Stage(1, 5)], 12, 2)
