import re

import numpy as np
import pytest

from keras_raptr import schedules
from keras_raptr.schedules import Stage


# Pure functions: no Keras state to clear.
pytestmark = pytest.mark.keras_free


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
        (float("nan"), 10, "positive number of blocks, got path_length=nan"),
        (float("inf"), 10, "positive number of blocks, got path_length=inf"),
        (-float("inf"), 10, "positive number of blocks"),
        ("6", 10, "number of blocks"),
        (True, 10, "number of blocks, got path_length=True"),
        (None, 10, "number of blocks, got path_length=None"),
        (6, 0, "positive integer"),
        (6, 1.5, "positive integer"),
        (6, 3.0, "positive integer number of optimizer steps, got steps=3.0"),
        (6, True, "positive integer number of optimizer steps, got steps=True"),
        (6, -3, "positive integer"),
        (6, "10", "positive integer"),
        (6, 2**31, "at most 2147483647 \\(2\\*\\*31 - 1\\), got Stage.steps=2147483648.*32-bit"),
        (6, 10**30, "at most 2147483647"),
    ],
)
def test_bad_stage(path_length, steps, match):
    with pytest.raises(ValueError, match=match):
        Stage(path_length, steps)


def test_stage_accepts_numpy_numbers_and_the_largest_step_count():
    stage = Stage(np.float32(2.5), np.int64(7))
    assert stage == Stage(2.5, 7)
    assert type(stage.path_length) is float and type(stage.steps) is int
    assert Stage(2, 2**31 - 1).steps == 2**31 - 1


def test_stages_that_add_up_past_the_int32_step_count_are_an_error():
    stages = [Stage(2, 2**30), Stage(4, 2**30)]
    match = "last 2147483648 optimizer steps in all, more than 2147483647"
    with pytest.raises(ValueError, match=match):
        schedules.stage_list(stages)
    assert len(schedules.stage_list(stages[:1] + [Stage(4, 2**30 - 1)])) == 2


@pytest.mark.parametrize(
    "spec, total, match",
    [
        ("6-x-12", 30, "'x' is not a positive number"),
        ("", 30, "The schedule spec '' is empty"),
        ("   ", 30, "is empty"),
        ("6--12", 30, "stage 1 is empty \\(a '-' at an end, or two in a row\\)"),
        ("-6-8", 30, "stage 0 is empty"),
        ("6-8-", 30, "stage 2 is empty"),
        ("a-b", 30, "'a' is not a positive number"),
        ("6-0-12", 30, "'0' is not a positive number"),
        ("6 8", 30, "'6 8' is not a positive number"),
        ("6,8", 30, "'6,8' is not a positive number"),
        ("6_0", 30, "'6_0' is not a positive number"),
        ("1e1", 30, "'1e1' is not a positive number"),
        ("nan-8", 30, "'nan' is not a positive number"),
        ("inf", 30, "'inf' is not a positive number"),
        ("6-8-12", 2, "at least 3"),
        ("6-8", 0, "at least 2 .*got total_steps=0"),
        ("6-8", -5, "got total_steps=-5"),
        ("6-8", 10.0, "must be an integer .*got total_steps=10.0"),
        ("6-8", True, "got total_steps=True"),
        ("6-8", 2**31, "`total_steps` must be at most 2147483647 .*got total_steps=2147483648"),
        ("6-8", 10**12, "at most 2147483647"),
        (["6", "8"], 30, "must be a string"),
        (None, 30, "must be a string"),
    ],
)
def test_bad_spec(spec, total, match):
    with pytest.raises(ValueError, match=match):
        schedules.parse_spec(spec, total)


@pytest.mark.parametrize(
    "spec, lengths",
    [
        (" 6 - 8 ", [6, 8]),
        ("6-8\n", [6, 8]),
        ("6.5-.5-8.", [6.5, 0.5, 8]),
        # Path lengths need not grow (the paper's do).
        ("8-6", [8, 6]),
    ],
)
def test_spec_whitespace_decimals_and_order(spec, lengths):
    assert [s.path_length for s in schedules.parse_spec(spec, 30)] == lengths


def test_spec_with_the_largest_step_count():
    stages = schedules.parse_spec("6-8", 2**31 - 1)
    assert sum(s.steps for s in stages) == 2**31 - 1


def test_stage_length_fractions_floor_exact_products():
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 steps.
    stages = schedules.parse_spec("6-8", 100, stage_lengths=(0.29, 0.71))
    assert [s.steps for s in stages] == [29, 71]
    stages = schedules.parse_spec("6-8-10", 1000, stage_lengths=(0.57, 0.29, 0.14))
    assert [s.steps for s in stages] == [570, 290, 140]


@pytest.mark.parametrize(
    "lengths, match",
    [
        ((True, 9), "must be positive numbers"),
        ((-1, 11), "must be positive numbers"),
        ((float("nan"), 1), "must be positive numbers"),
        ((float("inf"), 0.5), "must be positive numbers"),
        ((3.0, 7.0), "as fractions must add up to 1, got \\[3.0, 7.0\\].*Or give integer steps"),
        ((2.5, 7.5), "as fractions must add up to 1"),
        (("3", "7"), "must be positive numbers"),
    ],
)
def test_bad_stage_lengths_in_steps(lengths, match):
    with pytest.raises(ValueError, match=match):
        schedules.parse_spec("6-8", 10, stage_lengths=lengths)


def test_stage_lengths_as_numpy_arrays():
    steps = lambda lengths: [s.steps for s in schedules.parse_spec("6-8", 10, lengths)]
    assert steps(np.array([3, 7])) == [3, 7]
    assert steps(np.array([0.3, 0.7])) == [3, 7]


@pytest.mark.parametrize(
    "fixed, match",
    [
        ((0, 12), "index 12 is out of range"),
        ((-13,), "index -13 is out of range"),
        ((0, 0), "names the same block twice"),
        ((11, -1), "names the same block twice"),
        ((0.5,), "integer block indices"),
        ((1.0,), "integer block indices, got 1.0"),
        ((True,), "integer block indices, got True"),
    ],
)
def test_bad_fixed_blocks(fixed, match):
    with pytest.raises(ValueError, match=match):
        schedules.normalize_fixed_blocks(fixed, 12)


def test_default_fixed_blocks_on_one_block_say_what_to_pass():
    match = "names the same block twice.*pass `fixed_blocks=\\(0,\\)`"
    with pytest.raises(ValueError, match=match):
        schedules.normalize_fixed_blocks((0, -1), 1)
    assert schedules.normalize_fixed_blocks((np.int64(0),), 1) == (0,)


@pytest.mark.parametrize(
    "check, value, match",
    [
        (
            schedules.check_num_blocks,
            0,
            "`num_blocks` must be a positive integer.*got num_blocks=0",
        ),
        (schedules.check_num_blocks, -4, "got num_blocks=-4"),
        (schedules.check_num_blocks, 4.0, "got num_blocks=4.0"),
        (schedules.check_num_blocks, True, "got num_blocks=True"),
        (
            schedules.check_step,
            -1,
            "`step` must be an optimizer step, an integer >= 0, got step=-1",
        ),
        (schedules.check_step, 2.5, "got step=2.5"),
        (schedules.check_step, float("nan"), "got step=nan"),
        (schedules.check_step, True, "got step=True"),
    ],
)
def test_bad_block_counts_and_steps(check, value, match):
    with pytest.raises(ValueError, match=match):
        check(value)


def test_check_stages_bounds():
    with pytest.raises(ValueError, match="more than the model's 12 blocks"):
        schedules.check_stages([Stage(13, 5)], 12, 2)
    with pytest.raises(ValueError, match="fewer than the 2 fixed blocks"):
        schedules.check_stages([Stage(1, 5)], 12, 2)
