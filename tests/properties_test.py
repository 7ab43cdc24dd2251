"""Properties of the schedules and strategies over random inputs (hypothesis).

Host-side only: numpy and Python, no model, no training. The paths are
the engine's own host paths (`engine/path.py`), the ones the compiled step
computes again from the optimizer's step count. Examples are derandomized:
every run checks the same cases.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_raptr
from keras_raptr import flops as flops_lib
from keras_raptr import schedules
from keras_raptr.engine.path import host_path
from keras_raptr.engine.path import uniforms
from keras_raptr.engine.xp import NUMPY

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SEEDS = st.integers(-(2**63), 2**64)
# The chance that a run's total path length strays past the bound below.
FALSE_ALARM = 1e-9


# Nothing here builds a Keras object: no Keras state to clear.
pytestmark = pytest.mark.keras_free


@st.composite
def stage_schedules(draw, sampling=None):
    """`(StageSchedule, num_blocks)`: random stages that fit the blocks."""
    num_blocks = draw(st.integers(1, 16))
    indices = draw(
        st.lists(st.integers(0, num_blocks - 1), unique=True, max_size=min(3, num_blocks))
    )
    # Some written from the end, as `-1` is.
    fixed = tuple(i - num_blocks if draw(st.booleans()) else i for i in indices)
    sampling = sampling or draw(st.sampled_from(schedules.SAMPLING_MODES))
    low = len(fixed)
    if sampling == "subset":
        lengths = st.integers(max(low, 1), num_blocks)
    else:
        lengths = st.one_of(
            st.integers(max(low, 1), num_blocks),
            st.floats(low, num_blocks, exclude_min=low == 0, allow_nan=False),
        )
    stages = draw(
        st.lists(
            st.builds(keras_raptr.Stage, lengths, st.integers(1, 40)),
            min_size=1,
            max_size=5,
        )
    )
    schedule = keras_raptr.StageSchedule(stages, fixed_blocks=fixed, sampling=sampling)
    return schedule, num_blocks


@st.composite
def stackings(draw):
    """`(GradualStacking, num_blocks)`: strictly growing whole depths."""
    num_blocks = draw(st.integers(1, 16))
    depths = sorted(draw(st.sets(st.integers(1, num_blocks), min_size=1, max_size=5)))
    stages = [keras_raptr.Stage(d, draw(st.integers(1, 40))) for d in depths]
    return keras_raptr.GradualStacking(stages), num_blocks


PLDS = st.builds(
    keras_raptr.ProgressiveLayerDrop,
    theta_bar=st.floats(0.0, 1.0),
    gamma=st.one_of(st.just(0.0), st.floats(1e-6, 10.0)),
)
STOCHASTIC_DEPTHS = st.builds(
    keras_raptr.StochasticDepth,
    keep_prob=st.floats(1e-3, 1.0),
    distribution=st.sampled_from(("uniform", "linear")),
)


@st.composite
def any_strategy(draw):
    """`(strategy, num_blocks, steps)`: every strategy of the library."""
    kind = draw(st.sampled_from(("raptr", "stacking", "pld", "sd")))
    if kind == "raptr":
        strategy, num_blocks = draw(stage_schedules())
    elif kind == "stacking":
        strategy, num_blocks = draw(stackings())
    else:
        strategy = draw(PLDS if kind == "pld" else STOCHASTIC_DEPTHS)
        num_blocks = draw(st.integers(1, 16))
    # Past the end of a staged schedule, too.
    steps = getattr(strategy, "total_steps", 0) + draw(st.integers(0, 60))
    return strategy, num_blocks, max(steps, 1)


def path_lengths(plan, seed, steps):
    """The number of blocks on the host path of each step `0 .. steps - 1`."""
    tables = plan.tables()
    lengths = []
    for step in range(steps):
        path = host_path(plan, tables, seed, step)
        assert len(path) == plan.num_blocks
        assert all(path[i] for i in plan.fixed_blocks), (step, path)
        lengths.append(sum(path))
    return lengths


def bernstein_bound(variance):
    """How far a sum of independent on/off draws strays, at `FALSE_ALARM`.

    Bernstein's inequality for a sum with variance `v`:
    `P(|S - E[S]| >= t) <= 2 exp(-t^2 / (2 (v + t / 3)))`, solved for `t`.
    Unlike a multiple of the standard deviation, it holds for rare events
    too (a keep probability of 0.01 on a single step).
    """
    a = 2 * math.log(2 / FALSE_ALARM)
    return (a / 3 + math.sqrt(a * a / 9 + 4 * a * variance)) / 2


def assert_mean_length(lengths, keeps, num_blocks):
    """The total path length of a run against its expectation."""
    expected = math.fsum(math.fsum(keep) for keep in keeps)
    variance = math.fsum(k * (1 - k) for keep in keeps for k in keep)
    # Keep probabilities are float32 in the tables, draws 24-bit uniforms.
    slack = 1e-6 * len(keeps) * num_blocks
    assert abs(sum(lengths) - expected) <= bernstein_bound(variance) + slack


# ----------------------------------------------------------------------
# StageSchedule.


@SETTINGS
@given(case=stage_schedules())
def test_stage_at_changes_exactly_at_the_cumulative_boundaries(case):
    schedule, num_blocks = case
    stages = schedule.stages
    ends = list(itertools.accumulate(stage.steps for stage in stages))
    total = schedule.total_steps
    assert total == ends[-1]
    steps = range(total + 3)
    observed = [schedule.stage_at(t) for t in steps]
    assert observed[0] == 0
    assert observed == sorted(observed)
    assert [t for t in steps[1:] if observed[t] != observed[t - 1]] == ends
    assert observed[total:] == [len(stages)] * 3
    assert schedule.stage_at(schedules.MAX_STEPS) == len(stages)
    # The plan's stage (what the compiled step computes) agrees.
    plan = schedule.resolve(num_blocks)
    tables = plan.tables()
    assert [int(plan.stage(t, tables, NUMPY)) for t in steps] == observed

    num_fixed = len(plan.fixed_blocks)
    for t in steps:
        length = schedule.path_length_at(t, num_blocks)
        stage = observed[t]
        assert length == (stages[stage].path_length if stage < len(stages) else num_blocks)
        assert num_fixed <= length <= num_blocks
    for t in [0] + ends:
        keep = schedule.keep_probabilities_at(t, num_blocks)
        assert all(0.0 <= k <= 1.0 for k in keep)
        assert all(keep[i] == 1.0 for i in plan.fixed_blocks)
        assert math.fsum(keep) == pytest.approx(
            schedule.path_length_at(t, num_blocks), rel=1e-6, abs=1e-6
        )
        np.testing.assert_array_equal(plan.keep(t, tables, NUMPY), np.float32(keep))


@SETTINGS
@given(case=stage_schedules(), seed=SEEDS)
def test_sampled_paths_hold_the_fixed_blocks_and_the_expected_length(case, seed):
    schedule, num_blocks = case
    plan = schedule.resolve(num_blocks)
    steps = schedule.total_steps + 2
    lengths = path_lengths(plan, seed, steps)
    num_fixed = len(plan.fixed_blocks)
    keeps = []
    for t, k in enumerate(lengths):
        length = schedule.path_length_at(t, num_blocks)
        assert num_fixed <= k <= num_blocks
        if schedule.sampling == "subset" or t >= schedule.total_steps:
            assert k == round(length)
        keeps.append(schedule.keep_probabilities_at(t, num_blocks))
    assert_mean_length(lengths, keeps, num_blocks)


@SETTINGS
@given(
    num_blocks=st.integers(1, 32),
    keep=st.floats(0.0, 1.0),
    seed=SEEDS,
    start=st.integers(0, schedules.MAX_STEPS - 4096),
)
def test_each_block_is_on_the_path_with_its_keep_probability(num_blocks, keep, seed, start):
    # The draws of 4096 consecutive steps, all blocks at once: what
    # `host_path` compares with the keep probabilities at every step.
    steps = np.arange(start, start + 4096)
    with np.errstate(over="ignore"):
        draws = uniforms(seed, steps[:, None], num_blocks, NUMPY)
    counts = np.sum(draws < np.float32(keep), axis=0)
    # The draws are multiples of 2^-24: P(draw < k) = ceil(k 2^24) / 2^24.
    p = math.ceil(float(np.float32(keep)) * 2**24) / 2**24
    bound = bernstein_bound(len(steps) * p * (1 - p))
    assert np.all(np.abs(counts - len(steps) * p) <= bound), (counts, p)


@SETTINGS
@given(case=stage_schedules())
def test_compute_fraction_is_the_step_weighted_mean_path_length(case):
    schedule, num_blocks = case
    stages, total = schedule.stages, schedule.total_steps
    expected = sum(s.steps * s.path_length for s in stages) / (num_blocks * total)
    assert schedule.compute_fraction(num_blocks) == expected
    mean = math.fsum(schedule.path_length_at(t, num_blocks) for t in range(total))
    assert expected == pytest.approx(mean / (num_blocks * total), rel=1e-12)
    assert 0.0 <= expected <= 1.0


@SETTINGS
@given(case=stage_schedules())
def test_config_round_trip_keeps_the_schedule(case):
    schedule, num_blocks = case
    clone = keras_raptr.StageSchedule.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    assert clone.resolve(num_blocks) == schedule.resolve(num_blocks)


@st.composite
def specs(draw):
    """`(spec, path lengths, total_steps, stage_lengths, expected steps)`."""
    values = draw(st.lists(st.integers(1, 640).map(lambda k: k / 10), min_size=1, max_size=6))
    pad = st.sampled_from(("", " ", "  "))
    spec = "-".join(f"{draw(pad)}{v:g}{draw(pad)}" for v in values)
    n = len(values)
    total = n + draw(st.integers(0, 500))
    mode = draw(st.sampled_from(("equal", "steps", "fractions")))
    if mode == "equal":
        steps = [total // n] * n
        steps[-1] += total - sum(steps)
        return spec, values, total, None, steps
    if mode == "steps":
        cuts = []
        if n > 1:
            cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=n - 1, max_size=n - 1)))
        bounds = [0] + cuts + [total]
        steps = [b - a for a, b in zip(bounds, bounds[1:])]
        return spec, values, total, tuple(steps), steps
    weights = draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    fractions = tuple(w / sum(weights) for w in weights)
    # floor(fraction * total) in exact arithmetic; the last stage the rest.
    steps = [w * total // sum(weights) for w in weights[:-1]]
    steps.append(total - sum(steps))
    return spec, values, total, fractions, steps


@SETTINGS
@given(case=specs())
def test_from_spec_parses_lengths_and_splits_the_steps(case):
    spec, values, total, stage_lengths, steps = case
    if min(steps) < 1:
        with pytest.raises(ValueError, match="leave a stage with no step"):
            keras_raptr.StageSchedule.from_spec(spec, total, stage_lengths=stage_lengths)
        return
    schedule = keras_raptr.StageSchedule.from_spec(spec, total, stage_lengths=stage_lengths)
    assert [s.path_length for s in schedule.stages] == values
    assert [s.steps for s in schedule.stages] == steps
    assert schedule.total_steps == total


# ----------------------------------------------------------------------
# The peers: progressive layer dropping, stochastic depth, stacking.


@SETTINGS
@given(
    pld=PLDS,
    num_blocks=st.integers(1, 16),
    total=st.integers(1, 200),
    seed=SEEDS,
)
def test_pld_keep_probabilities_and_compute_fraction(pld, num_blocks, total, seed):
    plan = pld.resolve(num_blocks)
    tables = plan.tables()
    previous = None
    keeps = []
    for t in list(range(total)) + [10**6, schedules.MAX_STEPS]:
        keep = pld.keep_probabilities_at(t, num_blocks)
        assert all(0.0 <= k <= 1.0 for k in keep)
        # Deeper blocks drop more, and every block more as steps go by.
        assert all(a >= b for a, b in zip(keep, keep[1:]))
        if previous is not None:
            assert all(k <= p + 1e-12 for k, p in zip(keep, previous))
        previous = keep
        assert pld.path_length_at(t, num_blocks) == math.fsum(keep) or math.isclose(
            pld.path_length_at(t, num_blocks), math.fsum(keep), rel_tol=1e-12
        )
        np.testing.assert_allclose(plan.keep(t, tables, NUMPY), keep, atol=1e-6)
        if t < total:
            keeps.append(keep)
    mean = math.fsum(math.fsum(k) for k in keeps) / (num_blocks * total)
    fraction = pld.compute_fraction(num_blocks, total)
    assert fraction == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert_mean_length(path_lengths(plan, seed, total), keeps, num_blocks)
    if fraction < 1.0:
        again = keras_raptr.ProgressiveLayerDrop.from_compute_fraction(
            fraction, num_blocks, total, gamma=pld.gamma
        )
        assert again.compute_fraction(num_blocks, total) == pytest.approx(fraction, abs=1e-9)


@SETTINGS
@given(sd=STOCHASTIC_DEPTHS, num_blocks=st.integers(1, 16), seed=SEEDS)
def test_stochastic_depth_keep_probabilities_and_compute_fraction(sd, num_blocks, seed):
    keep = sd.keep_probabilities_at(0, num_blocks)
    assert all(0.0 < k <= 1.0 for k in keep)
    for t in (1, 17, schedules.MAX_STEPS):
        assert sd.keep_probabilities_at(t, num_blocks) == keep
    if sd.distribution == "uniform":
        assert keep == [sd.keep_prob] * num_blocks
    else:
        assert all(a >= b for a, b in zip(keep, keep[1:]))
        assert keep[-1] == pytest.approx(sd.keep_prob, abs=1e-12)
    fraction = sd.compute_fraction(num_blocks)
    assert fraction == pytest.approx(math.fsum(keep) / num_blocks, rel=1e-12)
    again = keras_raptr.StochasticDepth.from_compute_fraction(
        fraction, num_blocks, distribution=sd.distribution
    )
    assert again.keep_prob == pytest.approx(sd.keep_prob, abs=1e-9)
    plan = sd.resolve(num_blocks)
    steps = 40
    assert_mean_length(path_lengths(plan, seed, steps), [keep] * steps, num_blocks)


@SETTINGS
@given(case=stackings(), seed=SEEDS)
def test_stacking_trains_the_prefix_of_each_stage(case, seed):
    stacking, num_blocks = case
    stages, total = stacking.stages, stacking.total_steps
    plan = stacking.resolve(num_blocks)
    tables = plan.tables()
    ends = list(itertools.accumulate(s.steps for s in stages))
    for t in range(total + 2):
        stage = sum(t >= end for end in ends)
        depth = int(stages[stage].path_length) if stage < len(stages) else num_blocks
        assert stacking.depth_at(t, num_blocks) == depth
        keep = stacking.keep_probabilities_at(t, num_blocks)
        assert keep == [1.0] * depth + [0.0] * (num_blocks - depth)
        path = host_path(plan, tables, seed, t)
        assert path == tuple(i < depth for i in range(num_blocks))
    expected = sum(s.steps * s.path_length for s in stages) / (num_blocks * total)
    assert stacking.compute_fraction(num_blocks) == expected


# ----------------------------------------------------------------------
# FLOPs.


@SETTINGS
@given(
    case=any_strategy(),
    block_flops=st.integers(1, 10**6),
    other=st.integers(0, 10**6),
    data=st.data(),
)
def test_expected_run_flops_sum_the_keep_probabilities(case, block_flops, other, data):
    strategy, num_blocks, steps = case
    blocks = data.draw(
        st.lists(st.integers(1, block_flops), min_size=num_blocks, max_size=num_blocks)
    )
    flops = {"blocks": blocks, "other": other, "total": other + sum(blocks)}
    by_step = math.fsum(
        flops_lib.expected_step_flops(flops, strategy, t) for t in range(steps)
    )
    closed = flops_lib.expected_run_flops(flops, strategy, steps)
    assert closed == pytest.approx(by_step, rel=1e-9)
    # Between the cost of the embeddings and heads alone and the full network.
    assert steps * other * (1 - 1e-12) <= closed <= steps * flops["total"] * (1 + 1e-12)
