"""Width-wise parts: each step runs a random subset of every block's heads and units."""

import keras
import numpy as np
import pytest

import keras_raptr
from keras_raptr import schedules
from keras_raptr.engine import width
from keras_raptr.engine.xp import KERAS
from keras_raptr.engine.xp import NUMPY
from keras_raptr.layers import width_parts as parts_module

D, H, F, S, B = 20, 4, 64, 8, 3


# ----------------------------------------------------------------------
# The schedule.


@pytest.mark.keras_free
def test_stage_width_is_checked_and_kept_in_the_config():
    stage = keras_raptr.Stage(6, 10, width=0.5)
    assert stage.get_config() == {"path_length": 6.0, "steps": 10, "width": 0.5}
    assert keras_raptr.Stage(**stage.get_config()) == stage
    assert keras_raptr.Stage(6, 10).width == 1.0
    for bad in (0, 1.5, -0.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="Stage.width"):
            keras_raptr.Stage(6, 10, width=bad)


@pytest.mark.keras_free
def test_spec_notation_and_compute_fraction_count_width():
    schedule = keras_raptr.StageSchedule.from_spec("12@0.5-12@.75-12", total_steps=30)
    assert [s.width for s in schedule.stages] == [0.5, 0.75, 1.0]
    assert [s.path_length for s in schedule.stages] == [12.0, 12.0, 12.0]
    assert schedule.compute_fraction(12) == pytest.approx(0.75)
    assert schedule.width_at(9) == 0.5 and schedule.width_at(10) == 0.75
    assert schedule.width_at(1000) == 1.0
    assert "12@0.5-12@0.75-12" in repr(schedule)
    restored = keras_raptr.StageSchedule.from_config(schedule.get_config())
    assert restored.stages == schedule.stages
    assert schedules.width_over(schedule.stages, 0, 10) == 0.5
    assert schedules.width_over(schedule.stages, 9, 11) is None
    assert schedules.width_over(schedule.stages, 30, 40) == 1.0
    for bad in ("12@0-12", "12@2", "12@-12", "12@x"):
        with pytest.raises(ValueError, match="width"):
            keras_raptr.StageSchedule.from_spec(bad, total_steps=10)
    with pytest.raises(ValueError, match="grows depth only"):
        keras_raptr.GradualStacking([keras_raptr.Stage(2, 5, width=0.5)])


# ----------------------------------------------------------------------
# Which heads and units a step keeps.


def test_kept_draws_are_the_same_on_the_host_and_in_the_step():
    for step in (0, 1, 57):
        for block in (0, 3):
            host = width.kept(11, step, block, F, 32, "units", NUMPY)
            step_value = keras.ops.convert_to_numpy(
                width.kept(11, step, block, F, 32, "units", KERAS)
            )
            np.testing.assert_array_equal(host, step_value)
            assert len(set(host.tolist())) == 32 and list(host) == sorted(host)
    draws = {tuple(width.kept(11, s, 0, F, 32, "units", NUMPY)) for s in range(8)}
    assert len(draws) == 8  # a new draw at every step
    assert tuple(width.kept(11, 0, 0, F, 32, "units", NUMPY)) != tuple(
        width.kept(11, 0, 1, F, 32, "units", NUMPY)
    )


class _GqaParts:
    num_heads, num_key_value_heads, num_units = 8, 4, 16


def test_grouped_query_heads_are_kept_in_whole_groups():
    for xp in (NUMPY, KERAS):
        kept = width.kept_indices(_GqaParts, 0.5, 3, 5, 0, xp)
        heads = keras.ops.convert_to_numpy(kept["heads"]).tolist()
        groups = keras.ops.convert_to_numpy(kept["key_value_heads"]).tolist()
        assert len(groups) == 2 and len(heads) == 4
        assert heads == [2 * g + r for g in groups for r in (0, 1)]
    assert width.counts(_GqaParts, 0.1) == (2, 1, 2)  # at least one group


# ----------------------------------------------------------------------
# Training at a width below 1.


def _encoder_model(seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((S, D))
    blocks = [keras_hub.layers.TransformerEncoder(F, H, name=f"block_{i}") for i in range(2)]
    h = inputs
    for block in blocks:
        h = block(h)
    inner = keras.Model(inputs, keras.layers.Dense(D, name="head")(h))
    return keras_raptr.RandomPartModel(inner, blocks=blocks, seed=7), inner, blocks


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, S, D)).astype("float32"), rng.normal(size=(B, S, D)).astype("float32")


def _changed(before, after, axis):
    """Indices along `axis` where any entry changed."""
    moved = np.abs(after - before) > 0
    return np.nonzero(moved.any(axis=tuple(a for a in range(moved.ndim) if a != axis)))[0]


def _slot_arrays(model, variable):
    # Keras names a slot after its variable's path: `block_0_..._kernel_momentum`.
    prefix = variable.path.replace("/", "_") + "_"
    slots = [v for v in model.optimizer.variables if v.name.startswith(prefix)]
    assert len(slots) == 2, variable.path  # Adam's two moments
    return [keras.ops.convert_to_numpy(v) for v in slots]


@pytest.mark.parametrize("off_path_update", ["skip", "zero_grad"])
def test_a_step_at_half_width_runs_narrow_matrices_and_moves_only_kept_slices(
    off_path_update,
):
    model, inner, blocks = _encoder_model()
    model.compile(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.5), loss="mse")
    x, y = _data()
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)  # builds the optimizer's slots
    widths = []
    for block in blocks:
        dense = block._feedforward_output_dense
        call = dense.call

        def recording(inputs, *args, _call=call, **kwargs):
            widths.append(int(inputs.shape[-1]))
            return _call(inputs, *args, **kwargs)

        object.__setattr__(dense, "call", recording)
    variables = {v.path: v for v in model.trainable_variables}
    before = {p: keras.ops.convert_to_numpy(v) for p, v in variables.items()}
    slots_before = {p: _slot_arrays(model, v) for p, v in variables.items()}
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(2, step + 1, width=0.5)], fixed_blocks=(),
        off_path_update=off_path_update,
    )
    history = model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[schedule])
    assert history.history["width"] == [0.5]
    # Narrow matrices: the feed-forward output ran on 32 of 64 units.
    assert widths and set(widths) == {F // 2}
    after = {p: keras.ops.convert_to_numpy(v) for p, v in variables.items()}
    for i, block in enumerate(blocks):
        parts = parts_module.width_parts(block)
        kept = width.kept_indices(parts, 0.5, model.seed, step, i, NUMPY)
        assert len(kept["heads"]) == 2 and len(kept["units"]) == F // 2
        for variable, axis, part in parts.slices():
            moved = _changed(before[variable.path], after[variable.path], axis)
            if off_path_update == "skip":
                np.testing.assert_array_equal(moved, kept[part], err_msg=variable.path)
                dropped = np.setdiff1d(np.arange(variable.shape[axis]), kept[part])
                for old, new in zip(slots_before[variable.path], _slot_arrays(model, variable)):
                    np.testing.assert_array_equal(
                        np.take(old, dropped, axis=axis), np.take(new, dropped, axis=axis)
                    )
            else:
                # A zero gradient off the kept slices: weight decay moves them.
                assert len(moved) == variable.shape[axis], variable.path
    # Evaluation runs the full width: the inner model's output, 64 units.
    widths.clear()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x, training=False)),
        keras.ops.convert_to_numpy(inner(x, training=False)),
        rtol=1e-6,
    )
    assert set(widths) == {F}


@pytest.mark.parametrize("loss_scale", [False, True])
def test_the_update_runs_on_the_kept_slices_alone_and_equals_the_full_update(
    loss_scale, monkeypatch
):
    """AdamW (and under a loss scale) updates gathered slices: its gradients
    and, in the compiled step, its arithmetic have the narrow shapes, and
    the weights and slots it leaves equal those of the full-size update
    with the dropped slices put back."""
    x, y = _data()
    results = []
    for narrow in (True, False):
        model, _, blocks = _encoder_model()
        optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        if loss_scale:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)  # builds the slots
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        kernel = blocks[0]._feedforward_intermediate_dense.kernel
        seen = []
        own = inner._filter_empty_gradients

        def recording(grads, variables, _own=own):
            seen.extend(tuple(g.shape) for g, v in zip(grads, variables) if v is kernel)
            return _own(grads, variables)

        object.__setattr__(inner, "_filter_empty_gradients", recording)
        if not narrow:
            monkeypatch.setattr(width, "_can_narrow", lambda *args: False)
        step = int(keras.ops.convert_to_numpy(inner.iterations))
        schedule = keras_raptr.StageSchedule(
            [keras_raptr.Stage(2, step + 2, width=0.5)], fixed_blocks=()
        )
        model.fit(x, y, batch_size=1, steps_per_epoch=2, epochs=1, verbose=0, callbacks=[schedule])
        assert seen and set(seen) == {(D, F // 2) if narrow else (D, F)}
        results.append(
            [keras.ops.convert_to_numpy(v) for v in model.trainable_variables + optimizer.variables]
        )
        if narrow and not loss_scale and keras.backend.backend() != "torch":
            import os
            import re
            import sys

            sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
            import compiled_step

            text, _ = compiled_step.compiled(model, x, y, ("static", (True, True), 0.5))
            # No product or square root on a 64-unit axis: the full-size
            # update has dozens.
            full_size = [
                line
                for line in text.splitlines()
                if re.search(r"= f32\[[0-9,]*\b64\b[0-9,]*\]\S* (multiply|sqrt)\(", line)
            ]
            assert not full_size, full_size[:3]
        monkeypatch.undo()
    for narrow_value, full_value in zip(*results):
        np.testing.assert_allclose(narrow_value, full_value, rtol=1e-5, atol=1e-6)


def test_the_compiled_step_at_half_width_has_narrow_products_and_flops():
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch runs eagerly: the step above records its narrow matrices.")
    import sys, os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import compiled_step

    model, _, _ = _encoder_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = _data()
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(2, 5, width=0.5)], fixed_blocks=())
    model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[schedule])
    full = (True, True)
    narrow_text, narrow_cost = compiled_step.compiled(model, x, y, ("static", full, 0.5))
    full_text, full_cost = compiled_step.compiled(model, x, y, ("static", full))
    _, rest_cost = compiled_step.compiled(model, x, y, ("static", (False, False)))

    def dot_dims(text):
        dims = set()
        for line in text.splitlines():
            if " dot(" in line or "convolution(" in line:
                for shape in line.split("=")[1].split("dot(")[0:1]:
                    dims.update(int(d) for d in _numbers(shape))
                for operand in line.split("dot(")[-1].split(")")[0].split(","):
                    dims.update(int(d) for d in _numbers(operand.split("%")[0]))
        return dims

    assert F in dot_dims(full_text)
    assert F not in dot_dims(narrow_text)
    if keras.backend.backend() == "jax":
        # The blocks' FLOPs (forward, backward and update: the step's less
        # the step's without blocks) against a plain model built at half
        # width, which has the same layer norms and residuals.
        rest = rest_cost["flops"]
        plain = _plain_half_width_model()
        plain.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        plain.fit(x, y, batch_size=B, epochs=1, verbose=0)
        _, plain_cost = compiled_step.compiled(plain, x, y)
        plain_blocks = plain_cost["flops"] - rest
        assert (narrow_cost["flops"] - rest) <= 1.05 * plain_blocks
        assert (full_cost["flops"] - rest) > 1.5 * plain_blocks


class _PlainEncoder(keras.layers.Layer):
    """keras-hub's post-norm `TransformerEncoder`, built at 2 heads of 5 and 32 units."""

    def build(self, shape):
        self.attention = keras.layers.MultiHeadAttention(H // 2, D // H)
        self.attention.build(shape, shape)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.up = keras.layers.Dense(F // 2, activation="relu")
        self.down = keras.layers.Dense(D)
        for layer, s in ((self.norm1, shape), (self.norm2, shape), (self.up, shape)):
            layer.build(s)
        self.down.build((*shape[:-1], F // 2))

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.down(self.up(x)))


def _plain_half_width_model():
    inputs = keras.Input((S, D))
    h = _PlainEncoder()(_PlainEncoder()(inputs))
    return keras.Model(inputs, keras.layers.Dense(D)(h))


def _numbers(text):
    import re

    return [n for shape in re.findall(r"\[([0-9,]*)\]", text) for n in shape.split(",") if n]


def test_a_block_class_without_an_adapter_is_a_clear_error():
    class Residual(keras.layers.Layer):
        def build(self, shape):
            self.dense = keras.layers.Dense(shape[-1])
            self.dense.build(shape)

        def call(self, x):
            return x + self.dense(x)

    inputs = keras.Input((4,))
    blocks = [Residual(name="res")]
    inner = keras.Model(inputs, blocks[0](inputs))
    model = keras_raptr.RandomPartModel(inner, blocks=blocks)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(1, 2, width=0.5)], fixed_blocks=())
    x = np.ones((2, 4), "float32")
    with pytest.raises(ValueError, match="class `Residual`.*register_width_parts"):
        model.fit(x, x, epochs=1, verbose=0, callbacks=[schedule])


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_grouped_query_blocks_keep_whole_key_value_groups(name):
    import keras_hub

    keras.utils.set_random_seed(0)
    sizes = dict(vocabulary_size=20, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                 hidden_dim=16, intermediate_dim=32)
    if name == "llama":
        backbone = keras_hub.models.LlamaBackbone(**sizes)
    else:
        backbone = keras_hub.models.GemmaBackbone(**sizes, head_dim=4)
    model = keras_raptr.RandomPartModel(backbone, seed=5)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    rng = np.random.default_rng(0)
    # Distinct tokens: with one token everywhere, attention is uniform and
    # the query and key kernels get no gradient.
    x = {"token_ids": rng.integers(0, 20, (2, 6)).astype("int32"),
         "padding_mask": np.ones((2, 6), "int32")}
    y = rng.normal(size=(2, 6, 16)).astype("float32")
    before = {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}
    schedule = keras_raptr.StageSchedule([keras_raptr.Stage(2, 3, width=0.5)], fixed_blocks=())
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[schedule])
    for i, skip in enumerate(model.blocks):
        parts = parts_module.width_parts(skip.block)
        kept = width.kept_indices(parts, 0.5, model.seed, 0, i, NUMPY)
        assert len(kept["key_value_heads"]) == 1 and len(kept["heads"]) == 2
        for variable, axis, part in parts.slices():
            after = keras.ops.convert_to_numpy(variable)
            moved = _changed(before[variable.path], after, axis)
            assert set(moved) <= set(kept[part].tolist()), variable.path
            assert len(moved), variable.path


@pytest.mark.keras_free
def test_flops_accounting_counts_width():
    from keras_raptr import flops

    costs = {"blocks": [10.0, 10.0], "other": 4.0, "total": 24.0}
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(2, 3, width=0.5), keras_raptr.Stage(2, 1)], fixed_blocks=()
    )
    assert flops.expected_step_flops(costs, schedule, 0) == 4.0 + 10.0
    assert flops.expected_step_flops(costs, schedule, 3) == 24.0
    assert flops.expected_run_flops(costs, schedule, 4) == 3 * 14.0 + 24.0


def _moved_parts(model, before, step):
    """Per block: whether it moved, and whether what moved is its kept slices."""
    result = []
    for i, skip in enumerate(model.blocks):
        parts = parts_module.width_parts(skip.block)
        kept = width.kept_indices(parts, 0.5, model.seed, step, i, NUMPY)
        moved = {}
        for variable, axis, part in parts.slices():
            after = keras.ops.convert_to_numpy(variable)
            moved[variable.path] = (_changed(before[variable.path], after, axis), kept[part])
        result.append(moved)
    return result


def test_depth_and_width_together_and_after_a_save_and_load(tmp_path):
    model, _, blocks = _encoder_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = _data()
    stages = [keras_raptr.Stage(1, 2, width=0.5), keras_raptr.Stage(2, 2)]

    def schedule():
        return keras_raptr.StageSchedule(stages, fixed_blocks=(), sampling="subset")

    model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[schedule()])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    before = {v.path: keras.ops.convert_to_numpy(v) for v in loaded.trainable_variables}
    history = loaded.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[schedule()])
    assert history.history["width"] == [0.5] and history.history["path_length"] == [1.0]
    if keras.backend.backend() != "torch":
        assert list(loaded.compiled_train_steps) == ["conditional width 0.5"]
    # Step 1 (the loaded optimizer's count): one block on the path, at the
    # width drawn for step 1; the other block untouched.
    from keras_raptr.engine import path as path_module
    from keras_raptr.engine import steps as steps_module

    steps = loaded._steps
    on = path_module.host_path(steps.plan, steps.tables, loaded.seed, 1)
    assert sum(on) == 1
    for block_on, moved in zip(on, _moved_parts(loaded, before, 1)):
        for name, (changed, kept) in moved.items():
            if block_on:
                np.testing.assert_array_equal(changed, kept, err_msg=name)
            else:
                assert len(changed) == 0, name
    assert steps_module.variant_width(("conditional", 0.5)) == 0.5


def test_an_execution_spanning_a_change_of_width_is_a_clear_error():
    model, _, _ = _encoder_model()
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    x, y = _data()
    x, y = np.concatenate([x, x]), np.concatenate([y, y])
    schedule = keras_raptr.StageSchedule(
        [keras_raptr.Stage(2, 1, width=0.5), keras_raptr.Stage(2, 1)], fixed_blocks=()
    )
    with pytest.raises(ValueError, match="span a change of width.*steps_per_execution"):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[schedule])


def test_a_width_adapter_naming_a_wrong_axis_is_a_clear_error():
    dense = keras.layers.Dense(6)
    dense.build((2, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*axis 0.*8 entries"):
        keras_raptr.layers.WidthParts(
            num_heads=0, heads=[], num_units=8, units=[(dense.kernel, 0)]
        )
    with pytest.raises(ValueError, match="multiple of"):
        keras_raptr.layers.WidthParts(
            num_heads=3, heads=[], num_units=6, units=[(dense.kernel, 1)], num_key_value_heads=2
        )


@pytest.mark.parametrize("inverse", [False, True])
def test_a_narrow_block_computes_the_full_block_without_its_dropped_parts(inverse):
    """The narrow call equals the full block whose dropped heads' and units'
    output rows are zero (and, with `scaling="inverse"`, whose kept output
    rows are scaled by the inverse of the kept fraction)."""
    _, _, blocks = _encoder_model()
    block = blocks[0]
    x = keras.ops.convert_to_tensor(_data()[0])
    parts = parts_module.width_parts(block)
    kept = width.kept_indices(parts, 0.5, 7, 3, 0, NUMPY)
    indices = {k: keras.ops.convert_to_tensor(v) for k, v in kept.items()}
    narrow = width.narrow_call(
        block, parts, indices, type(block).call.__get__(block), (x,), {}, inverse
    )
    narrow = keras.ops.convert_to_numpy(keras.ops.stop_gradient(narrow))
    attention_out = block._self_attention_layer.output_dense.kernel
    ffn_out = block._feedforward_output_dense.kernel
    for kernel, part, total in ((attention_out, "heads", H), (ffn_out, "units", F)):
        value = keras.ops.convert_to_numpy(kernel).copy()
        dropped = np.setdiff1d(np.arange(total), kept[part])
        value[dropped] = 0.0
        if inverse:
            value[kept[part]] *= total / len(kept[part])
        kernel.assign(value)
    full = keras.ops.convert_to_numpy(keras.ops.stop_gradient(block(x)))
    np.testing.assert_allclose(narrow, full, rtol=1e-5, atol=1e-5)
