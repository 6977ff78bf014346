"""Where a training run computes: the distribution strategy, the precision policy and JAX multi-process setup.

The config values are checked by ``recipes.check_config`` (a strategy against the backend, multi-process
against JAX); this module turns them into Keras and backend objects. TensorFlow is imported only for the
TensorFlow strategies and device queries.
"""

import contextlib
import os

import keras

from keras_convmixer.errors import first_line


def has_accelerator():
    """Whether the backend sees a GPU or TPU (the ``auto`` precision is then bfloat16)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def set_precision(cfg):
    """Set the global dtype policy for ``cfg["precision"]`` and return its name."""
    policy = cfg["precision"]
    if policy == "auto":
        policy = "mixed_bfloat16" if has_accelerator() else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


class PeerLost(RuntimeError):
    """Another process of a multi-process run stopped: this one cannot go on (its collectives have no peer)."""


# What JAX's CPU (gloo) and GPU (NCCL) collectives and its coordination service say when a peer process has
# gone. JAX raises these as JaxRuntimeError from a step, but as a ValueError from the equality check of a
# device_put onto a global sharding, so the text is what tells.
_PEER_GONE = ("gloo", "nccl", "heartbeat timeout", "coordination service", "barrier failed")


def _chain(err):
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def peer_lost(err, cfg):
    """A ``PeerLost`` naming the stopped process when ``err`` (or an error it came from) is a collective or
    coordination failure of a multi-process run, else None. With two processes the stopped one is the other;
    with more, the collectives do not say which."""
    n = int(cfg["num_processes"])
    if n < 2 or not any(mark in str(e).lower() for e in _chain(err) for mark in _PEER_GONE):
        return None
    who = f"process {1 - int(cfg['process_id'])}" if n == 2 else "another process"
    return PeerLost(
        f"{who} of this {n}-process run stopped, so process {cfg['process_id']} stops too: the finished epochs are "
        "saved; run the same command again on every machine to resume."
    )


def init_distributed(cfg):
    """Join the JAX multi-process job, before any JAX computation."""
    if cfg["strategy"] in ("data-parallel", "auto") and cfg["num_processes"] > 1:
        keras.distribution.initialize(
            job_addresses=cfg["coordinator"], num_processes=cfg["num_processes"], process_id=cfg["process_id"]
        )


def _tf_logical_cpus(n):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(n))


def make_strategy(cfg):
    """Return ``(scope, name, num_replicas)`` for ``cfg["strategy"]``. JAX data parallelism is set
    globally with ``keras.distribution`` and its scope is a no-op."""
    name, backend = cfg["strategy"], keras.backend.backend()
    if name == "auto":
        if backend == "tensorflow":
            import tensorflow as tf

            name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
        elif backend == "jax":
            import jax

            name = "data-parallel" if len(jax.devices()) > 1 or cfg["num_processes"] > 1 else "none"
        else:
            name = "none"
    if name == "none":
        return contextlib.nullcontext(), name, 1
    if name == "data-parallel":
        distribution = keras.distribution.DataParallel()
        if cfg["num_processes"] > 1:
            # Each process feeds its own shard of the arrays; Keras would otherwise demand a tf.data.Dataset.
            distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)
        import jax

        return contextlib.nullcontext(), name, len(jax.devices())
    import tensorflow as tf

    if name == "mirrored":
        if cfg["logical_cpus"]:
            _tf_logical_cpus(cfg["logical_cpus"])
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:  # tpu
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as err:
            raise ValueError(f"--strategy tpu: no TPU found ({first_line(err)}).") from None
        strategy = tf.distribute.TPUStrategy(resolver)
    return strategy.scope(), name, strategy.num_replicas_in_sync
