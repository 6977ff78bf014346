"""AdamW with a second learning rate for part of the model, as a PyTorch parameter group would give it.

Fine-tuning usually steps the pretrained backbone more gently than the new head (timm's and
keras-hub's "lower backbone learning rate"). Keras 3 optimizers have one learning rate for every
variable, so ``GroupedAdamW`` splits the variables it was built on into two groups and runs each
backend's own update (TensorFlow's distributed one, the torch and JAX ones) once per group: the
variables whose path matches ``scaled_variables`` step with ``learning_rate * lr_scale``, both in
the Adam update and in the decoupled weight decay, exactly as ``torch.optim.AdamW`` with a group
of ``lr = lr * lr_scale`` does. ``lr_scale=1`` is plain AdamW.
"""

import contextlib
import math
import re

import keras

# The ConvMixer backbone (the patch embedding and every block) as variable paths; the head (and
# anything else) keeps the full learning rate.
from keras_convmixer.structure import BACKBONE_VARIABLES


@keras.saving.register_keras_serializable(package="keras_convmixer")
class GroupedAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` whose variables with a path matching ``scaled_variables`` (a regular
    expression, searched) use ``lr_scale`` times the learning rate, for the Adam step and the weight
    decay alike. Every other argument is AdamW's."""

    def __init__(self, *args, lr_scale=1.0, scaled_variables=BACKBONE_VARIABLES, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale <= 1:
            raise ValueError(f"lr_scale must be a number in (0, 1], got {lr_scale!r}.")
        if math.isnan(lr_scale):
            raise ValueError("lr_scale must be a number in (0, 1], got nan.")
        try:
            self._scaled_pattern = re.compile(scaled_variables)
        except (re.error, TypeError) as err:
            raise ValueError(
                f"scaled_variables must be a regular expression, got {scaled_variables!r} ({err})."
            ) from None
        self.lr_scale = float(lr_scale)
        self.scaled_variables = scaled_variables
        self._scaled_keys = set()

    def build(self, var_list):
        # Group membership is fixed here, by path, so it survives TensorFlow's distributed
        # variables (keyed through _var_key) and JAX's stateless apply (same Variable objects).
        self._scaled_keys = {self._var_key(v) for v in var_list if self._scaled_pattern.search(v.path)}
        super().build(var_list)

    def scaled(self, variable):
        """Whether ``variable`` steps with the scaled learning rate."""
        return self._var_key(variable) in self._scaled_keys

    def _groups(self, grads, variables):
        """``[(grads, variables, scale)]``: the full-rate group, then the scaled one; empty groups left out."""
        full, part = ([], []), ([], [])
        for grad, var in zip(grads, variables, strict=True):
            group = part if self.scaled(var) else full
            group[0].append(grad)
            group[1].append(var)
        return [(g, v, s) for (g, v), s in ((full, 1.0), (part, self.lr_scale)) if v]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if self.lr_scale == 1.0:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        for group_grads, group_vars, scale in self._groups(grads, trainable_variables):
            rate = learning_rate if scale == 1.0 else learning_rate * scale
            super()._backend_update_step(group_grads, group_vars, rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or self.lr_scale == 1.0:
            return super()._apply_weight_decay(variables)
        full = [v for v in variables if not self.scaled(v)]
        part = [v for v in variables if self.scaled(v)]
        if full:
            super()._apply_weight_decay(full)
        if part:
            # Every backend decays by learning_rate * weight_decay, read at trace time: scaling the
            # decay for this group is scaling its learning rate.
            with self._weight_decay_times(self.lr_scale):
                super()._apply_weight_decay(part)

    @contextlib.contextmanager
    def _weight_decay_times(self, factor):
        saved = self.weight_decay
        self.weight_decay = saved * factor
        try:
            yield
        finally:
            self.weight_decay = saved

    def get_config(self):
        return {**super().get_config(), "lr_scale": self.lr_scale, "scaled_variables": self.scaled_variables}
