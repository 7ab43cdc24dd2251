import keras
import pytest


@pytest.fixture(autouse=True)
def _clear_session():
    keras.backend.clear_session()
    yield
