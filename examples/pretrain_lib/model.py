"""The task, its strategy (RaPTr or a peer), the learning rate, the preset."""

from pretrain_lib.errors import ExampleError


def preset_task(args):
    """The task and tokenizer of `--preset`."""
    import keras_raptr

    task_name = "BertMaskedLM" if args.objective == "mlm" else "GPT2CausalLM"
    try:
        task = keras_raptr.RandomPartModel.from_preset(args.preset, task=task_name).inner
    except (OSError, ValueError, ImportError) as error:
        raise ExampleError(f"--preset {args.preset!r}: {error}") from error
    longest = getattr(task.backbone, "max_sequence_length", None)
    if longest is not None and args.seq_len > longest:
        raise ExampleError(
            f"--seq-len {args.seq_len} is longer than the preset's maximum "
            f"sequence length {longest}; pass --seq-len {longest} or less."
        )
    tokenizer = getattr(task.preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ExampleError(
            f"--preset {args.preset!r} has no tokenizer to read the corpus with."
        )
    return task, tokenizer


def build_task(args, vocabulary_size):
    import keras_hub

    sizes = dict(
        vocabulary_size=vocabulary_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=args.seq_len,
        dropout=0.1,
    )
    if args.objective == "mlm":
        backbone = keras_hub.models.BertBackbone(**sizes)
        return keras_hub.models.BertMaskedLM(backbone, preprocessor=None)
    backbone = keras_hub.models.GPT2Backbone(**sizes)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def default_schedule(method, num_blocks):
    n = num_blocks
    if method == "raptr":
        return "-".join(str(k) for k in (n // 2, 2 * n // 3, 5 * n // 6, n))
    if method == "stacking":
        return "-".join(str(k) for k in (n // 2, 3 * n // 4, n))
    if method in ("pld", "stochastic-depth"):
        return "matched"
    return None


def make_strategy(args, num_blocks):
    """The method's strategy callback (`None` for the baseline)."""
    import keras_raptr

    spec = args.schedule or default_schedule(args.method, num_blocks)
    try:
        if args.method == "baseline":
            return None
        lengths = stage_lengths(getattr(args, "stage_lengths", None))
        off_path_update = getattr(args, "off_path_update", "skip")
        if args.method == "raptr":
            spec = with_widths(spec, getattr(args, "width_schedule", None))
            return keras_raptr.StageSchedule.from_spec(
                spec, total_steps=args.steps, stage_lengths=lengths, **raptr_options(args)
            )
        if args.method == "stacking":
            return keras_raptr.GradualStacking.from_spec(
                spec, total_steps=args.steps, stage_lengths=lengths,
                off_path_update=off_path_update,
            )
        if spec == "matched":
            # RaPTr's default schedule, with --stage-lengths if given.
            reference = keras_raptr.StageSchedule.from_spec(
                default_schedule("raptr", num_blocks), total_steps=args.steps,
                stage_lengths=lengths,
            )
            fraction = reference.compute_fraction(num_blocks)
        else:
            fraction = float(spec)
        if args.method == "pld":
            # DeepSpeed's gamma (0.001) suits runs of tens of thousands of
            # steps; scaled to this run, theta(t) settles within its first
            # fifth, so that RaPTr's compute is reachable.
            return keras_raptr.ProgressiveLayerDrop.from_compute_fraction(
                fraction, num_blocks, total_steps=args.steps, gamma=5.0 / args.steps,
                off_path_update=off_path_update,
            )
        return keras_raptr.StochasticDepth.from_compute_fraction(
            fraction, num_blocks, off_path_update=off_path_update
        )
    except ValueError as error:
        raise ExampleError(f"--schedule {spec!r} for --method {args.method}: {error}") from error


def with_widths(spec, widths):
    """`--schedule` with `--width-schedule`'s widths: "6-12", "0.5-1" -> "6@0.5-12@1"."""
    if not widths:
        return spec
    stages, fractions = spec.split("-"), widths.split("-")
    if len(stages) != len(fractions):
        raise ValueError(
            f"--width-schedule {widths!r} has {len(fractions)} widths for the "
            f"{len(stages)} stages of {spec!r}: give one width per stage."
        )
    return "-".join(f"{s.strip()}@{w.strip()}" for s, w in zip(stages, fractions))


def stage_lengths(text):
    """`--stage-lengths` ("2,2,2,4" steps, or "0.2,0.2,0.2,0.4" fractions)."""
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        if all(part.isdigit() for part in parts):
            return [int(part) for part in parts]
        return [float(part) for part in parts]
    except ValueError:
        raise ExampleError(
            f"--stage-lengths {text!r}: write one length per stage, joined by "
            "commas: steps (200,200,200,400) or fractions (0.2,0.2,0.2,0.4)."
        ) from None


def learning_rate(args):
    """`--learning-rate`, constant or under `--lr-schedule warmup-cosine`."""
    import keras

    if getattr(args, "lr_schedule", "constant") == "constant":
        return args.learning_rate
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    # Linear warm-up from 0 to --learning-rate, then a cosine decay to 0 at
    # --steps (Keras' own schedule; it saves and resumes with the optimizer).
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, args.steps - warmup),
        warmup_target=args.learning_rate, warmup_steps=warmup,
    )


def raptr_options(args):
    """`StageSchedule` options from `--sampling`, `--scaling`, `--fixed-blocks`."""
    fixed = getattr(args, "fixed_blocks", "0,-1")
    if fixed == "none":
        fixed_blocks = ()
    else:
        try:
            fixed_blocks = tuple(int(i) for i in fixed.split(","))
        except ValueError:
            raise ExampleError(
                f"--fixed-blocks {fixed!r}: give block indices separated by "
                "commas (e.g. 0,-1) or none."
            ) from None
    return {
        "sampling": getattr(args, "sampling", "bernoulli"),
        "scaling": getattr(args, "scaling", "none"),
        "fixed_blocks": fixed_blocks,
        "off_path_update": getattr(args, "off_path_update", "skip"),
    }


def compute_fraction(strategy, num_blocks, steps):
    if strategy is None:
        return 1.0
    if hasattr(strategy, "total_steps"):
        return strategy.compute_fraction(num_blocks)
    try:
        return strategy.compute_fraction(num_blocks, total_steps=steps)
    except TypeError:
        return strategy.compute_fraction(num_blocks)


def save_preset(task, tokenizer, args, directory):
    """The trained task as a keras-hub preset, with its tokenizer (MLM)."""
    import keras_hub

    if args.objective == "mlm":
        task.preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
            tokenizer, sequence_length=args.seq_len
        )
    try:
        task.save_to_preset(directory)
    finally:
        task.preprocessor = None


def stage_plan(strategy, steps):
    """Where each stage of `strategy` begins, before the run measures it.

    One row per stage that begins within `steps`: `stage` (its index),
    `step` (the optimizer steps before it), `path_length` and `width`. Empty
    for a strategy without stages (the baseline, `pld`, `stochastic-depth`).
    """
    rows, begin = [], 0
    for index, stage in enumerate(getattr(strategy, "stages", None) or ()):
        if begin >= steps:
            break
        rows.append(
            {"stage": index, "step": begin, "path_length": float(stage.path_length),
             "width": float(getattr(stage, "width", 1.0))}
        )
        begin += stage.steps
    return rows
