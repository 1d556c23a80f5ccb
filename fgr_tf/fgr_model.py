"""`FGRModel`: a keras.Model whose train_step adds the FGR / IGR penalties."""

import contextlib

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from fgr_tf import errors
from fgr_tf import regularizers
from fgr_tf import validation
from fgr_tf import warp
from fgr_tf.backbones import folding

_PENALTY_LOGS = ("ce", "fgr_penalty", "igr_penalty")


def _check_non_negative(**values):
  for name, value in values.items():
    if not isinstance(value, (int, float)) or not value >= 0:
      raise errors.UserError(f"{name} must be a number >= 0. Received: "
                       f"{name}={value!r}")


@contextlib.contextmanager
def tensor_float_32(enabled):
  """Sets TensorFloat-32 for float32 matmuls/convolutions, then restores it.

  Ampere and newer NVIDIA GPUs run float32 convolutions and matmuls in
  TF32 (10-bit mantissa) by default, in TensorFlow and in PyTorch's cuDNN.
  FGR differentiates a gradient, and TF32 costs it dearly: on an H200 the
  PyTorch original's FGR parameter gradients (VGG-11) came out 2.4e-1 off
  float64 with TF32, 1.3e-5 without. `FGRModel.fit` trains with TF32 off
  unless built with `allow_tf32=True`; wrap a custom training loop that
  uses `flow_gradient_penalty` in `tensor_float_32(False)`. No effect on
  CPUs. (The setting applies to what runs and compiles inside the block.)
  """
  previous = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(enabled)
  try:
    yield
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(previous)


def _check_message(error):
  """The first line of a failed input check ("FGRModel...: ..."), or None."""
  for line in str(error).splitlines():
    if "FGRModel" in line and ("must" in line or "contain" in line):
      return line.strip()
  return None


@keras.saving.register_keras_serializable(package="fgr_tf")
class FGRModel(keras.Model):
  """Trains a classifier with flow gradient regularization.

  Each training step (SPEC §1), for a batch of B images x and labels y:
    1. (optional) x <- adversary(backbone, x, y, seed) (adversarial
       training);
    2. if fgr_lambda > 0 and rs_sigma > 0: x <- random_deform(x, rs_sigma);
    3. loss = mean CE(backbone(x), y); g = d loss / d flow at a zero flow
       (inner GradientTape);
    4. total = loss + fgr_lambda * FGR(g) + igr_lambda * IGR
       + backbone regularization losses;
    5. the optimizer applies d total / d weights (outer GradientTape).
  The penalties are in the original's units (`fgr_tf.regularizers`), for
  the GLOBAL batch under tf.distribute: a step on N replicas equals a step
  on one device with the same global batch (BatchNorm aside, unless
  synchronized).

  `call`, `predict` and `evaluate` use the backbone unchanged (val_loss is
  the compiled loss, by default the CE on logits).

  Args:
    backbone: keras.Model mapping [B, H, W, C] float images in [0, 1] to
      [B, classes] logits (e.g. `fgr_tf.backbones.build(...)`).
    fgr_lambda: weight of the flow gradient penalty, >= 0 (the original's
      meaning: 300 at batch 128 reproduces the paper's CIFAR-10 result).
    rs_sigma: std of the random-start flow in NORMALIZED units (0.01 =
      0.155 px at 32x32), >= 0; used only when fgr_lambda > 0, as the
      original does.
    igr_lambda: weight of the input gradient penalty (IGR baseline), >= 0.
    adversary: optional callable `(backbone, images, labels, seed) ->
      images` producing the training inputs (adversarial training; e.g.
      `fgr_tf.attacks.adversary(attack)`); `seed` is a [2] int32 tensor,
      different at every step and replica, for stateless random ops. Not
      saved by `get_config`.
    seed: int seed of the random start and of the adversary (stateless, per
      step and replica).
    allow_tf32: let GPUs run float32 convolutions and matmuls in TF32 while
      an FGR/IGR model trains (`fit`, `train_on_batch`). Default False:
      TF32 makes the penalty's gradients ~1e-1 wrong (see
      `tensor_float_32`); plain training (both lambdas 0) leaves the
      global setting alone.

  Example:
    ```python
    backbone = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
    model = fgr_tf.FGRModel(backbone, fgr_lambda=300.0, rs_sigma=0.01)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  metrics=["accuracy"])
    model.fit(images, labels, batch_size=128, epochs=80)
    ```
  Logs: `loss` (total objective), `ce`, `fgr_penalty` (if fgr_lambda > 0),
  `igr_penalty` (if igr_lambda > 0) and the compiled metrics.
  """

  def __init__(self, backbone, fgr_lambda=0.0, rs_sigma=0.01, igr_lambda=0.0,
               adversary=None, seed=0, allow_tf32=False, **kwargs):
    super().__init__(**kwargs)
    _check_non_negative(fgr_lambda=fgr_lambda, rs_sigma=rs_sigma,
                        igr_lambda=igr_lambda)
    if not isinstance(backbone, keras.Model):
      raise TypeError("backbone must be a keras.Model. Received: "
                      f"backbone={type(backbone).__name__}")
    if adversary is not None and not callable(adversary):
      raise TypeError("adversary must be callable (backbone, images, labels, "
                      f"seed) -> images. Received: adversary={adversary!r}")
    self.backbone = backbone
    self.fgr_lambda = float(fgr_lambda)
    self.rs_sigma = float(rs_sigma)
    self.igr_lambda = float(igr_lambda)
    self.adversary = adversary
    self.seed = int(seed)
    self.allow_tf32 = bool(allow_tf32)
    self._training_call = False  # inside fit / train_on_batch
    self.ce_tracker = keras.metrics.Mean(name="ce")
    self.fgr_tracker = (keras.metrics.Mean(name="fgr_penalty")
                        if self.fgr_lambda > 0 else None)
    self.igr_tracker = (keras.metrics.Mean(name="igr_penalty")
                        if self.igr_lambda > 0 else None)
    # The training step calls the backbone, never `self`: mark the wrapper
    # built whenever the backbone is, so that saving sees its weights.
    self.built = backbone.built

  def build(self, input_shape):
    if not self.backbone.built:
      self.backbone.build(input_shape)
    self.built = True

  def call(self, inputs, training=False):
    if training is False and not isinstance(inputs, keras.KerasTensor):
      # predict / evaluate: BatchNorms folded into their convolutions.
      return folding.inference_function(self.backbone)(inputs)
    return self.backbone(inputs, training=training)

  def compile(self, optimizer="rmsprop", loss=None, jit_compile="auto",
              **kwargs):
    """keras.Model.compile; loss defaults to sparse CE on logits.

    The loss is used by evaluate/test_step only: the training objective is
    fixed by this class. jit_compile="auto" is Keras's rule: XLA on GPUs
    and TPUs (where it is fast, and exact: tests/test_exactness.py), not on
    CPU-only machines (XLA measured ~8x slower there for conv nets), not
    under a multi-replica tf.distribute strategy, not with op determinism.

    Raises:
      UserError: jit_compile=True under MirroredStrategy-like strategies
        with several replicas: Keras 3 compiles `strategy.run` inside one
        XLA function, which cannot reach the other devices' variables
        (keras-team/keras#19005, tensorflow/tensorflow#53140).
    """
    if loss is None:
      loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    strategy = self._distribute_strategy
    if (jit_compile is True and strategy is not None and
        strategy.num_replicas_in_sync > 1 and
        not isinstance(strategy, tf.distribute.TPUStrategy)):
      raise errors.UserError(
          "jit_compile=True does not work with a multi-replica "
          f"{type(strategy).__name__} in Keras 3 (XLA cannot reach the "
          "other replicas' variables; keras-team/keras#19005). Use "
          "jit_compile='auto' or False.")
    super().compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile,
                    **kwargs)

  def _training_context(self):
    """TF32 off while the penalties train (unless allow_tf32)."""
    if self.allow_tf32 or not (self.fgr_lambda > 0 or self.igr_lambda > 0):
      return contextlib.nullcontext()
    return tensor_float_32(False)

  def _checked(self, x, y, where):
    """Checks arrays whole; wraps pipelines so each batch is checked before
    the (possibly XLA-compiled) step."""
    channels, classes = validation.model_shape(self.backbone)
    if isinstance(x, (np.ndarray, tf.Tensor)):
      validation.check_images(x, where, channels)
      if y is not None:
        validation.check_labels(y, where, classes, batch=len(x))
      return x
    x, checked = validation.checked_batches(x, "FGRModel", channels, classes)
    if not checked and self.jit_compile:
      logging.warning(
          "FGRModel: inputs of type %s are not checked under XLA (which "
          "drops assertion ops): pass arrays, a tf.data.Dataset, a "
          "keras.utils.PyDataset or a generator.", type(x).__name__)
    return x

  def _run(self, method, *args, **kwargs):
    """Runs keras.Model.`method` (fit or train_on_batch) in the training
    context; a failed input check surfaces as a one-line UserError."""
    self._training_call = True
    try:
      with self._training_context():
        return method(*args, **kwargs)
    except tf.errors.InvalidArgumentError as e:
      message = _check_message(e)
      if message is None:
        raise
      raise errors.UserError(message) from e
    finally:
      self._training_call = False

  def fit(self, x=None, y=None, *args, **kwargs):
    """keras.Model.fit, with TF32 off while the penalties train (see
    `allow_tf32`) and every batch checked before the training step
    (`fgr_tf.validation`): images [N, H, W, C] floats in [0, 1], finite;
    labels [N] ints in [0, classes). Arrays are checked whole, first."""
    x = self._checked(x, y, "FGRModel.fit")
    return self._run(super().fit, x, y, *args, **kwargs)

  def train_on_batch(self, x, y=None, *args, **kwargs):
    """keras.Model.train_on_batch, checked and with TF32 as `fit`."""
    x = self._checked(x, y, "FGRModel.train_on_batch")
    return self._run(super().train_on_batch, x, y, *args, **kwargs)

  def compile_from_config(self, config):
    # keras skips compile_from_config for models that override compile().
    config = keras.saving.deserialize_keras_object(config)
    self.compile(**config)
    if self.built:
      self.optimizer.build(self.trainable_variables)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
      # Without a strategy Keras defers building the optimizer and the
      # metrics to the first trace of the step function; variables created
      # there make tf.function trace the step a second time (the FGR step's
      # trace is seconds long). When training, build before, from shapes:
      # the dataset's element spec (no batch is consumed) or the given
      # batch. Not in evaluate / test_on_batch: that would build the
      # optimizer for the variables trainable then, not at the first fit.
      if not self._training_call:
        return
      if data_batch is not None:  # train_on_batch: (x, y, sample_weight)
        data_batch = tuple(v if v is None or hasattr(v, "shape") else
                           np.asarray(v) for v in data_batch)
      elif iterator is not None:
        dataset = getattr(iterator, "_distributed_dataset", None)
        data_batch = getattr(dataset, "element_spec", None)
      if data_batch is not None:
        self._symbolic_build(data_batch=data_batch)
      return
    # Keras 3 (up to 3.15 at least) builds from a batch it gets by
    # strategy.reduce("MEAN", per_replica_batch), which fails under
    # MultiWorkerMirroredStrategy (keras-team/keras#20585). Building needs
    # shapes only: take the first local replica's part instead.
    if iterator is not None and self._distribute_strategy is not None:
      strategy = self.distribute_strategy
      for _, _, it in iterator:
        data_batch = keras.tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0] if isinstance(
                v, tf.distribute.DistributedValues) else v, next(it))
        break
      iterator = None
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  def _replica_info(self, local_batch):
    """(replica context or None, number of replicas, global batch size)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
      return None, 1, local_batch
    global_batch = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                  tf.cast(local_batch, tf.float32))
    return ctx, ctx.num_replicas_in_sync, global_batch

  def _step_seed(self, ctx, num_replicas, stream):
    """A stateless seed [2] for this step and replica; `stream` 0 = random
    start, 1 = adversary."""
    replica_id = 0 if ctx is None else ctx.replica_id_in_sync_group
    step = tf.cast(self.optimizer.iterations, tf.int32)
    return tf.stack([tf.constant(2 * self.seed + stream, tf.int32),
                     step * num_replicas + replica_id])

  def _objective(self, images, labels, global_batch, num_replicas):
    """Returns (total, logits, {name: local share of the global value})."""
    use_penalty = self.fgr_lambda > 0 or self.igr_lambda > 0
    if use_penalty:
      ce, input_grad, logits = regularizers.loss_and_input_gradient(
          self.backbone, images, labels, True, global_batch)
    else:
      logits = self.backbone(images, training=True)
      ce = regularizers.sparse_ce_sum(logits, labels) / tf.cast(
          global_batch, tf.float32)
    parts = {"ce": ce}
    total = ce
    if self.fgr_lambda > 0:
      flow_grad = regularizers.flow_gradient_from_input_gradient(
          images, input_grad)
      parts["fgr_penalty"] = regularizers.penalty_from_flow_gradient(
          flow_grad, global_batch)
      total += self.fgr_lambda * parts["fgr_penalty"]
    if self.igr_lambda > 0:
      parts["igr_penalty"] = regularizers.input_penalty_from_input_gradient(
          input_grad, global_batch)
      total += self.igr_lambda * parts["igr_penalty"]
    if self.backbone.losses:
      # Each replica adds the full regularization loss and the optimizer
      # sums gradients over replicas: divide by N to count it once.
      total += tf.add_n([tf.cast(l, tf.float32) for l in self.backbone.losses
                        ]) / num_replicas
    return total, logits, parts

  def train_step(self, data):
    images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if sample_weight is not None:
      raise errors.UserError("FGRModel does not support sample weights: the "
                             "FGR penalty is defined for the unweighted batch "
                             "mean.")
    channels, classes = validation.model_shape(self.backbone)
    images = validation.check_images(images, "FGRModel", channels)
    labels = validation.check_labels(labels, "FGRModel", classes)
    if not self.jit_compile:  # inputs fit could not wrap; XLA drops these
      with tf.control_dependencies(
          validation.graph_assertions(images, labels, classes)):
        images = tf.identity(images)
    images = tf.cast(images, tf.float32)
    local_batch = tf.shape(images)[0]
    ctx, num_replicas, global_batch = self._replica_info(local_batch)

    if self.adversary is not None:
      images = tf.stop_gradient(self.adversary(
          self.backbone, images, labels, self._step_seed(ctx, num_replicas, 1)))
    if self.fgr_lambda > 0 and self.rs_sigma > 0:
      images = warp.random_deform(
          images, self.rs_sigma, self._step_seed(ctx, num_replicas, 0))

    with tf.GradientTape() as tape:
      total, logits, parts = self._objective(images, labels, global_batch,
                                             num_replicas)
      scaled = self.optimizer.scale_loss(total)
    weights = self.trainable_weights
    self.optimizer.apply_gradients(zip(tape.gradient(scaled, weights),
                                       weights))

    def global_value(local_share):
      if ctx is None:
        return local_share
      return ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_share)

    self._loss_tracker.update_state(global_value(total),
                                    sample_weight=local_batch)
    for name, tracker in (("ce", self.ce_tracker),
                          ("fgr_penalty", self.fgr_tracker),
                          ("igr_penalty", self.igr_tracker)):
      if tracker is not None:
        tracker.update_state(global_value(parts[name]),
                             sample_weight=local_batch)
    return self._multi_worker_logs(
        self.compute_metrics(images, labels, logits, sample_weight=None))

  def test_step(self, data):
    logs = super().test_step(data)
    return self._multi_worker_logs(
        {k: v for k, v in logs.items() if k not in _PENALTY_LOGS})

  def _multi_worker_logs(self, logs):
    """Scalar logs as shape [1] under MultiWorkerMirroredStrategy.

    Keras 3 reduces step outputs there with strategy.reduce("MEAN", v,
    axis=0), which rejects scalars (keras-team/keras#20585); a [1] vector
    reduces to the scalar Keras expects.
    """
    if not isinstance(self.distribute_strategy,
                      tf.distribute.MultiWorkerMirroredStrategy):
      return logs
    return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v
            for k, v in logs.items()}

  def get_config(self):
    config = super().get_config()
    config.update({
        "backbone": keras.saving.serialize_keras_object(self.backbone),
        "fgr_lambda": self.fgr_lambda,
        "rs_sigma": self.rs_sigma,
        "igr_lambda": self.igr_lambda,
        "seed": self.seed,
        "allow_tf32": self.allow_tf32,
    })
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["backbone"] = keras.saving.deserialize_keras_object(
        config["backbone"])
    return cls(**config)
