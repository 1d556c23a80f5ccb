"""tf.distribute strategies by name."""

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def get_strategy(name="auto", tpu_address=""):
  """Returns a tf.distribute.Strategy.

  Args:
    name: "auto" (MirroredStrategy over all GPUs when there are several,
      else the default one-device strategy), "default", "mirrored" (all
      local GPUs, or the CPU), "multi_worker" (MultiWorkerMirroredStrategy
      configured from the TF_CONFIG environment variable), or "tpu".
    tpu_address: TPU name or grpc address for "tpu" ("" = local / Colab).

  Raises:
    ValueError: unknown name.
  """
  if name not in STRATEGIES:
    raise ValueError(f"Unknown strategy {name!r}. Expected one of "
                     f"{STRATEGIES}.")
  if name == "auto":
    gpus = tf.config.list_logical_devices("GPU")
    name = "mirrored" if len(gpus) > 1 else "default"
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)
