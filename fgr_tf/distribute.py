"""tf.distribute strategies by name."""

import tensorflow as tf

from fgr_tf import errors

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def get_strategy(name="auto", devices=None, tpu_address=""):
  """Returns a tf.distribute.Strategy.

  Args:
    name: "auto" (MirroredStrategy over all GPUs when there are several,
      else the default one-device strategy), "default", "mirrored",
      "multi_worker" (MultiWorkerMirroredStrategy configured from the
      TF_CONFIG environment variable), or "tpu".
    devices: for "mirrored", the device names; default all GPUs, or all
      logical CPUs when there is no GPU. On CPUs the replicas reduce through
      one device (`tf.distribute.ReductionToOneDevice`): TF's collective
      all-reduce between logical CPUs fails with "Shape mismatch in the
      collective instance" as soon as a model all-reduces inside the step
      (synchronized BatchNorm), even with plain Keras training.
    tpu_address: TPU name or grpc address for "tpu" ("" = local / Colab).

  Raises:
    ValueError: unknown name.
  """
  if name not in STRATEGIES:
    raise errors.UserError(f"Unknown strategy {name!r}. Expected one of "
                           f"{STRATEGIES}.")
  if name == "auto":
    gpus = tf.config.list_logical_devices("GPU")
    name = "mirrored" if len(gpus) > 1 else "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices is None:
      devices = [d.name for d in tf.config.list_logical_devices("GPU")]
      devices = devices or [d.name for d in
                            tf.config.list_logical_devices("CPU")]
    on_cpu = all("CPU" in d.upper() for d in devices)
    return tf.distribute.MirroredStrategy(
        devices,
        cross_device_ops=tf.distribute.ReductionToOneDevice() if on_cpu
        else None)
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)
