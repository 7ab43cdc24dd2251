"""`--distribute`: data-parallel training over every visible device."""

import contextlib

from pretrain_lib.errors import ExampleError


def distribute(args):
    """The backend's multi-device engine over every visible device.

    Returns the device count and the scope to build the model in: JAX sets a
    `keras.distribution.DataParallel`; TensorFlow makes a
    `tf.distribute.MirroredStrategy` (over the GPUs, else the CPU devices).
    """
    import keras

    if keras.backend.backend() == "jax":
        devices = keras.distribution.list_devices()
    else:
        import tensorflow as tf

        devices = [
            d.name
            for d in tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("CPU")
        ]
    if args.batch_size % len(devices):
        raise ExampleError(
            f"--batch-size {args.batch_size} does not split over {len(devices)} "
            f"devices; use a multiple of {len(devices)}."
        )
    if keras.backend.backend() == "jax":
        scope = _distribution_scope(keras.distribution.DataParallel(devices=devices))
    else:
        scope = tf.distribute.MirroredStrategy(devices).scope()
    print(f"training data-parallel on {len(devices)} devices")
    return len(devices), scope


@contextlib.contextmanager
def _distribution_scope(distribution):
    import keras

    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)
