import keras
import pytest


@pytest.fixture(autouse=True)
def _clear_session(request):
    # Tests marked `keras_free` build no Keras object: nothing to clear (it
    # costs 0.1 to 0.2 s a test).
    if request.node.get_closest_marker("keras_free") is None:
        keras.backend.clear_session()
    yield
