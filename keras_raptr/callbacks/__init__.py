"""Callbacks of keras-raptr: schedules that drive a RandomPartModel during fit."""
