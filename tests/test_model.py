"""FGRModel: the training step, logs, serialization, validation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bench import first_fit
import fgr_tf
from fgr_tf import regularizers
from helpers import TINY_BN_ZERO_GRADIENT, assert_close_float32
from helpers import assert_weights_close, copy_of, float32_tolerance
from helpers import tiny_backbone, tiny_data

LR = 0.1
# float32 round-off on tiny_data() and tiny_backbone() (helpers): the
# longest sum has batch * h * w = 8 * 8 * 8 = 512 terms (BatchNorm's
# statistics, the conv kernel's gradient); 3 reducing layers (conv,
# BatchNorm, dense). Inference: the dense layer's 64 inputs are the longest
# sum (BatchNorm uses its moving statistics).
REDUCTION = 8 * 8 * 8
LAYERS = 3
INFERENCE_REDUCTION = 4 * 4 * 4


def sgd():
  return keras.optimizers.SGD(LR)


def fit_one_step(model, images, labels):
  return model.fit(images, labels, batch_size=len(images), epochs=1,
                   shuffle=False, verbose=0).history


def test_zero_lambda_zero_sigma_equals_plain_keras_update():
  images, labels = tiny_data()
  backbone = tiny_backbone()
  initial = backbone.get_weights()
  plain = copy_of(backbone)
  plain.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model = fgr_tf.FGRModel(backbone, fgr_lambda=0.0, rs_sigma=0.0)
  model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9))
  for _ in range(2):
    fit_one_step(plain, images, labels)
    history = fit_one_step(model, images, labels)
  # 2 steps, each forward and backward through the 3 layers.
  assert_weights_close(model.backbone.get_weights(), plain.get_weights(),
                       initial, REDUCTION, 2 * 2 * LAYERS,
                       TINY_BN_ZERO_GRADIENT)
  assert set(history) == {"loss", "ce"}


@pytest.mark.parametrize("fgr_lambda,igr_lambda", [(300.0, 0.0), (0.0, 50.0),
                                                   (100.0, 20.0)])
def test_step_applies_gradient_of_ce_plus_penalties(fgr_lambda, igr_lambda):
  images, labels = tiny_data()
  backbone = tiny_backbone()
  reference = copy_of(backbone)
  with tf.GradientTape() as tape:
    ce, fgr = fgr_tf.flow_gradient_penalty(reference, images, labels)
    _, igr = fgr_tf.input_gradient_penalty(reference, images, labels)
    total = ce + fgr_lambda * fgr + igr_lambda * igr
  grads = tape.gradient(total, reference.trainable_variables)
  initial = [w.numpy() for w in reference.trainable_variables]
  expected = [w - LR * g.numpy() for w, g in zip(initial, grads)]

  model = fgr_tf.FGRModel(backbone, fgr_lambda=fgr_lambda, rs_sigma=0.0,
                          igr_lambda=igr_lambda)
  model.compile(optimizer=sgd(), metrics=["accuracy"])
  logs = fit_one_step(model, images, labels)
  # One step: the weight gradients of the penalties cross the 3 layers 3
  # times (forward, input gradient, its derivative). The conv bias before
  # BatchNorm (trainable variable 1) has a zero gradient but for
  # round-off of the sums that make the kernel's (0).
  assert_weights_close(
      [v.numpy() for v in model.backbone.trainable_variables], expected,
      initial, REDUCTION, 3 * LAYERS, TINY_BN_ZERO_GRADIENT)
  # The values: CE crosses the layers forward; the penalties also back.
  assert_close_float32(logs["ce"][0], ce, REDUCTION, LAYERS, err_msg="ce")
  assert_close_float32(logs["loss"][0], total, REDUCTION, 2 * LAYERS,
                       err_msg="loss")
  if fgr_lambda:
    assert_close_float32(logs["fgr_penalty"][0], fgr, REDUCTION, 2 * LAYERS,
                         err_msg="fgr_penalty")
    assert fgr > 0
  else:
    assert "fgr_penalty" not in logs
  if igr_lambda:
    assert_close_float32(logs["igr_penalty"][0], igr, REDUCTION, 2 * LAYERS,
                         err_msg="igr_penalty")
  assert "accuracy" in logs


def test_random_start_changes_the_update_and_is_seeded():
  images, labels = tiny_data()
  backbone = tiny_backbone()

  def trained(rs_sigma, seed):
    model = fgr_tf.FGRModel(copy_of(backbone), fgr_lambda=100.0,
                            rs_sigma=rs_sigma, seed=seed)
    model.compile(optimizer=sgd())
    fit_one_step(model, images, labels)
    return model.backbone.get_weights()[0]

  without = trained(0.0, 0)
  with_rs = trained(0.05, 0)
  # Changed by more than the round-off of one FGR step.
  assert np.abs(without - with_rs).max() > float32_tolerance(
      np.abs(without).max(), REDUCTION, 3 * LAYERS)
  np.testing.assert_array_equal(with_rs, trained(0.05, 0))
  assert not np.array_equal(with_rs, trained(0.05, 1))


def test_adversary_supplies_the_training_inputs():
  images, labels = tiny_data()
  backbone = tiny_backbone()
  calls = []

  def flip(model, batch, batch_labels, seed):
    calls.append((model, seed.shape))
    return tf.reverse(batch, axis=[2])

  model = fgr_tf.FGRModel(copy_of(backbone), rs_sigma=0.0, adversary=flip)
  model.compile(optimizer=sgd())
  fit_one_step(model, images, labels)
  plain = fgr_tf.FGRModel(copy_of(backbone), rs_sigma=0.0)
  plain.compile(optimizer=sgd())
  fit_one_step(plain, images[:, :, ::-1], labels)
  assert calls and calls[0] == (model.backbone, (2,))
  # One CE step (fgr_lambda 0): forward and backward through the layers.
  assert_weights_close(model.get_weights(), plain.get_weights(),
                       backbone.get_weights(), REDUCTION, 2 * LAYERS,
                       TINY_BN_ZERO_GRADIENT)


def test_evaluate_and_predict_use_the_backbone():
  images, labels = tiny_data()
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=10.0)
  model.compile(optimizer=sgd(), metrics=["accuracy"])
  fit_one_step(model, images, labels)
  logits = model.backbone(images, training=False)
  assert_close_float32(model.predict(images, verbose=0), logits,
                       INFERENCE_REDUCTION, LAYERS)
  results = model.evaluate(images, labels, verbose=0, return_dict=True)
  assert set(results) == {"loss", "accuracy"}
  ce = regularizers.sparse_ce_sum(logits, labels) / len(labels)
  # The layers, then CE's log-sum-exp and batch mean.
  assert_close_float32(results["loss"], ce, INFERENCE_REDUCTION, LAYERS + 1)


@pytest.mark.parametrize("source", ["arrays", "dataset", "train_on_batch"])
def test_each_step_is_traced_once(source):
  # Keras builds the optimizer and metrics inside the first trace when no
  # strategy is set, and tf.function then traces the step again.
  images, labels = tiny_data()
  model = first_fit.CountingFGRModel(tiny_backbone(), fgr_lambda=10.0)
  model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                metrics=["accuracy"])
  if source == "train_on_batch":
    for _ in range(2):
      model.train_on_batch(images, labels)
    model.test_on_batch(images, labels)
  else:
    x, y, batch_size = images, labels, 4
    if source == "dataset":
      x = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
      y = batch_size = None
    model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0,
              validation_data=x if y is None else (x, y))
    model.evaluate(x, y, batch_size=batch_size, verbose=0)
  assert model.traces == {"train": 1, "test": 1}
  assert model.optimizer.iterations.numpy() == (2 if source ==
                                                "train_on_batch" else 4)


def test_building_before_the_trace_keeps_kerass_behaviour():
  images, labels = tiny_data()
  # evaluate leaves the optimizer unbuilt: variables made trainable
  # afterwards are trained by the next fit, as with keras.Model.
  backbone = tiny_backbone()
  backbone.get_layer("dense").trainable = False
  model = fgr_tf.FGRModel(backbone, fgr_lambda=10.0)
  model.compile(optimizer=sgd())
  model.evaluate(images, labels, verbose=0)
  assert not model.optimizer.built
  backbone.get_layer("dense").trainable = True
  before = backbone.get_layer("dense").get_weights()[0]
  fit_one_step(model, images, labels)
  assert np.any(backbone.get_layer("dense").get_weights()[0] != before)
  # train_on_batch takes labels as a Python list.
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=10.0)
  model.compile(optimizer=sgd())
  logs = model.train_on_batch(images, labels.tolist(), return_dict=True)
  assert np.isfinite(logs["loss"])


def test_save_and_load_round_trip(tmp_path):
  images, labels = tiny_data()
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=300.0, rs_sigma=0.02,
                          igr_lambda=1.0, seed=7)
  model.compile(optimizer=sgd())
  fit_one_step(model, images, labels)
  path = tmp_path / "model.keras"
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded, fgr_tf.FGRModel)
  assert (loaded.fgr_lambda, loaded.rs_sigma, loaded.igr_lambda,
          loaded.seed) == (300.0, 0.02, 1.0, 7)
  assert_close_float32(loaded.predict(images, verbose=0),
                       model.predict(images, verbose=0), INFERENCE_REDUCTION,
                       LAYERS)
  # Training continues from the restored optimizer state.
  fit_one_step(loaded, images, labels)


@pytest.mark.parametrize("kwargs,field", [
    ({"fgr_lambda": -1.0}, "fgr_lambda=-1.0"),
    ({"rs_sigma": -0.01}, "rs_sigma=-0.01"),
    ({"igr_lambda": float("nan")}, "igr_lambda=nan"),
    ({"fgr_lambda": "300"}, "fgr_lambda='300'"),
])
def test_rejects_bad_hyperparameters(kwargs, field):
  with pytest.raises(ValueError, match=field):
    fgr_tf.FGRModel(tiny_backbone(), **kwargs)


def test_rejects_non_model_backbone_and_bad_images():
  with pytest.raises(TypeError, match="keras.Model"):
    fgr_tf.FGRModel(lambda x: x)
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=1.0)
  model.compile(optimizer=sgd())
  images, labels = tiny_data()
  with pytest.raises(ValueError, match="float images"):
    model.fit((images * 255).astype(np.uint8), labels, verbose=0)


def test_jit_compile_auto_is_off_on_cpu():
  model = fgr_tf.FGRModel(tiny_backbone())
  model.compile(optimizer=sgd())
  if not tf.config.list_logical_devices("GPU"):
    assert model.jit_compile is False


@pytest.mark.parametrize("policy", [
    "mixed_float16",
    pytest.param("mixed_bfloat16", marks=pytest.mark.bfloat16_kernels)])
def test_mixed_precision_keeps_the_penalty_in_float32(policy):
  images, labels = tiny_data(size=16, channels=3)
  backbone = fgr_tf.backbones.build("small_cnn", 3, (16, 16, 3), dtype=policy)
  loss, penalty = fgr_tf.flow_gradient_penalty(backbone, images, labels)
  assert loss.dtype == tf.float32 and penalty.dtype == tf.float32
  assert np.isfinite(penalty.numpy()) and penalty > 0
  model = fgr_tf.FGRModel(backbone, fgr_lambda=1.0)
  optimizer = sgd()
  if policy == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  model.compile(optimizer=optimizer)
  logs = fit_one_step(model, images, labels)
  assert all(np.isfinite(v[0]) for v in logs.values())
  assert logs["fgr_penalty"][0] > 0


class _RecordTF32(keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.seen = []

  def on_train_batch_begin(self, batch, logs=None):
    self.seen.append(
        tf.config.experimental.tensor_float_32_execution_enabled())


@pytest.mark.parametrize("fgr_lambda,allow_tf32,expected", [
    (10.0, False, False),  # FGR trains with TF32 off
    (10.0, True, True),    # unless allowed
    (0.0, False, True),    # plain training leaves the setting alone
])
def test_tf32_is_off_while_the_penalty_trains(fgr_lambda, allow_tf32,
                                              expected, monkeypatch):
  images, labels = tiny_data()
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=fgr_lambda,
                          allow_tf32=allow_tf32)
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  record = _RecordTF32()
  tf.config.experimental.enable_tensor_float_32_execution(True)
  try:
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0,
              callbacks=[record])
    during_batch = []
    with fgr_tf.tensor_float_32(False):
      during_batch.append(
          tf.config.experimental.tensor_float_32_execution_enabled())
    calls = []
    enable = tf.config.experimental.enable_tensor_float_32_execution
    monkeypatch.setattr(tf.config.experimental,
                        "enable_tensor_float_32_execution",
                        lambda on: calls.append(on) or enable(on))
    model.train_on_batch(images[:4], labels[:4])
    monkeypatch.undo()
    assert calls == ([] if expected else [False, True])
    assert tf.config.experimental.tensor_float_32_execution_enabled()
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(True)
  assert record.seen == [expected, expected]
  assert during_batch == [False]
  # Saved with the model.
  assert fgr_tf.FGRModel.from_config(model.get_config()).allow_tf32 == (
      allow_tf32)


def test_xla_under_a_multi_replica_strategy_is_refused_clearly():
  strategy = fgr_tf.distribute.get_strategy("mirrored")  # 2 logical CPUs
  with strategy.scope():
    model = fgr_tf.FGRModel(tiny_backbone(batch_norm=False), fgr_lambda=1.0)
    model.compile(optimizer=sgd())  # "auto": Keras turns XLA off here
    assert model.jit_compile is False
    with pytest.raises(fgr_tf.errors.UserError, match="keras#19005"):
      model.compile(optimizer=sgd(), jit_compile=True)
