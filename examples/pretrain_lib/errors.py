"""The example's errors: each is printed, with its exit code."""


class ExampleError(Exception):
    """A problem with the run's inputs: printed, and the exit code is 2."""

    exit_code = 2


class LossNotFinite(ExampleError):
    """The training loss became NaN or infinite: printed, the exit code is 3.

    Training stops at the step it happened; nothing is written after it.
    """

    exit_code = 3
