"""timm's batch MixUp/CutMix and soft targets, built from Keras's own ``MixUp`` and ``CutMix`` layers."""

import keras
from keras import ops

from keras_convmixer.tf_import import import_tf


def soft_targets(labels, num_classes, smoothing, xp_one_hot):
    """One-hot float targets with label smoothing folded in (timm: off = s/n, on = 1 - s + s/n)."""
    targets = xp_one_hot(labels, num_classes)
    return targets * (1.0 - smoothing) + smoothing / num_classes


@keras.saving.register_keras_serializable(package="keras_convmixer")
class MixupCutmix(keras.layers.Layer):
    """timm's batch MixUp/CutMix on integer labels, built from ``keras.layers.MixUp``/``CutMix``.

    Per batch: with probability ``mix_prob`` the batch is mixed; a mixed batch uses CutMix with
    probability ``switch_prob`` (when both alphas are > 0), else MixUp. Labels become soft
    one-hot targets with ``label_smoothing`` folded in before mixing, as timm does. Keras's layers
    draw lambda and the partner per sample (timm's "elem" mode) and CutMix's label weight uses the
    real-valued box, within a pixel of the pasted one.

    ``host=True`` selects with tf ops, for use in a tf.data map under any backend; otherwise
    ``keras.ops`` (inside the train step).
    """

    def __init__(
        self,
        num_classes,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        mix_prob=1.0,
        switch_prob=0.5,
        label_smoothing=0.0,
        host=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.mix_prob = float(mix_prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.host = bool(host)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Each inner layer its own seed: layers seeded alike draw the same uniforms, which would tie
        # the choice between MixUp and CutMix to MixUp's own draws.
        inner = (None, None) if seed is None else (int(seed) + 1, int(seed) + 2)
        self.mixup = keras.layers.MixUp(alpha=self.mixup_alpha, seed=inner[0]) if self.mixup_alpha > 0 else None
        # CutMix's factor is the range its alpha is drawn from: pin it to cutmix_alpha.
        self.cutmix = (
            keras.layers.CutMix(factor=(self.cutmix_alpha, self.cutmix_alpha), seed=inner[1])
            if self.cutmix_alpha > 0
            else None
        )

    def _ops(self):
        if self.host:
            tf = import_tf()
            return tf.one_hot, lambda: tf.random.uniform([]), tf.where
        return ops.one_hot, lambda: keras.random.uniform((), seed=self.seed_generator), ops.where

    def call(self, images, labels):
        one_hot, uniform, where = self._ops()
        targets = soft_targets(labels, self.num_classes, self.label_smoothing, one_hot)
        if self.mixup is None and self.cutmix is None:
            return images, targets
        data = {"images": images, "labels": targets}
        mixed = self.mixup(data, training=True) if self.mixup is not None else None
        cut = self.cutmix(data, training=True) if self.cutmix is not None else None
        if mixed is None or cut is None:
            chosen = mixed if cut is None else cut
        else:
            use_cut = uniform() < self.switch_prob
            chosen = {k: where(use_cut, cut[k], mixed[k]) for k in ("images", "labels")}
        apply = uniform() < self.mix_prob
        return where(apply, chosen["images"], images), where(apply, chosen["labels"], targets)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            mix_prob=self.mix_prob,
            switch_prob=self.switch_prob,
            label_smoothing=self.label_smoothing,
            host=self.host,
            seed=self.seed,
        )
        return config
