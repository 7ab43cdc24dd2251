"""Models of keras-raptr."""
