"""Calling a layer or an optimizer on values instead of its variables.

`child_scope(pairs)` is a `keras.StatelessScope` that maps the given
variables to values and reads every other variable from the scope it is
opened in (Keras' own scope reads it from the variable). The loop step runs
block 0's code on another block's weights with it, and the optimizer's update
on another block's rows; the conditional step runs a block inside a branch.
"""

import keras

_CLASS = None


def child_scope(pairs, collect_losses=False):
    """A stateless scope mapping `pairs` `(variable, value)` over the current one."""
    global _CLASS
    if _CLASS is None:
        from keras.src.backend.common.stateless_scope import get_stateless_scope

        class ChildScope(keras.StatelessScope):
            def __init__(self, state_mapping, collect_losses):
                self._parent = get_stateless_scope()
                super().__init__(state_mapping=state_mapping, collect_losses=collect_losses)

            def get_current_value(self, variable):
                value = super().get_current_value(variable)
                if value is None and self._parent is not None:
                    value = self._parent.get_current_value(variable)
                return value

        _CLASS = ChildScope
    return _CLASS(list(pairs), collect_losses)


def values_of(scope, variables):
    """The scope's current value of each variable."""
    return [scope.get_current_value(v) for v in variables]
