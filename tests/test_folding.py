"""BatchNorm folding (`fgr_tf.backbones.folding`): the same inference function
as the model's own, on every backbone, following its weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf.backbones import first_block
from fgr_tf.backbones import folding
from tests.helpers import assert_close_float32
from tests.helpers import tiny_backbone

# (name, input shape, foldable pairs, longest conv reduction, layers deep).
BACKBONES = [("vgg11", (32, 32, 3), 8, 9 * 512, 9),
             ("resnet18", (16, 16, 3), 20, 9 * 512, 19),
             ("small_cnn", (12, 12, 1), 2, 9 * 32, 4)]


def _with_trained_statistics(model, seed=0):
  """Moving statistics, gammas, betas and conv biases away from their
  initial values (fresh ones, mean 0, variance 1 and bias 0, would hide a
  wrong fold)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
      layer.bias.assign(rng.uniform(-0.5, 0.5, layer.bias.shape))
    if isinstance(layer, keras.layers.BatchNormalization):
      for variable, low, high in ((layer.moving_mean, -1, 1),
                                  (layer.moving_variance, 0.2, 3),
                                  (layer.gamma, 0.5, 1.5),
                                  (layer.beta, -0.5, 0.5)):
        variable.assign(rng.uniform(low, high, variable.shape))
  return model


def _float64_copy(model, name, shape):
  copy = fgr_tf.backbones.build(name, 10, shape, dtype="float64")
  copy.set_weights(model.get_weights())
  return copy


def _function(model, prepared):
  """The folded inference function; `prepared`: its loop form (weights
  read and transformed by `prepare()`, here at every call), "varying" its
  form for batches that change size (`prepare(varying_batch=True)`: no
  XLA pieces)."""
  if prepared:
    varying = prepared == "varying"
    return lambda x: folding.prepared_inference_function(model)(varying)(x)
  return folding.inference_function(model)


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("name,shape,pairs,reduction,depth", BACKBONES)
def test_folded_inference_equals_the_float64_model(name, shape, pairs,
                                                   reduction, depth,
                                                   prepared):
  keras.utils.set_random_seed(0)
  model = _with_trained_statistics(fgr_tf.backbones.build(name, 10, shape))
  assert len(folding.foldable_pairs(model)) == pairs
  images = np.random.default_rng(1).uniform(size=(4,) + shape)
  folded = tf.function(_function(model, prepared))
  float64 = _float64_copy(model, name, shape)
  expected = float64(images, training=False)
  actual = folded(tf.constant(images, tf.float32))
  # One more rounding per layer (the scaled kernel and bias) than the
  # unfolded float32 model: within the same bound.
  assert_close_float32(actual.numpy(), expected.numpy(), reduction, depth)
  # The float64 model folds too, and equals its unfolded self to float64
  # rounding.
  np.testing.assert_allclose(
      _function(float64, prepared)(images).numpy(),
      expected.numpy(), rtol=0, atol=1e-11 * np.abs(expected).max())


@pytest.mark.parametrize("prepared", [False, True, "varying"])
@pytest.mark.parametrize("backbone", [0, 2])
def test_input_gradients_equal_the_unfolded_model(prepared, backbone):
  """The attacks differentiate the folded function w.r.t. its input (the
  prepared one pools before its ReLUs: `relu_pool_pairs`; on varying
  batches its first layer's gradient is `few_channels.
  input_gradient_by_ops`)."""
  name, shape, _, reduction, depth = BACKBONES[backbone]
  keras.utils.set_random_seed(0)
  model = _with_trained_statistics(fgr_tf.backbones.build(name, 10, shape))
  float64 = _float64_copy(model, name, shape)
  images = np.random.default_rng(2).uniform(size=(4,) + shape)

  def input_gradient(function, dtype):
    x = tf.constant(images, dtype)
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
          tf.constant([0, 1, 2, 3]), function(x)))
    return tape.gradient(loss, x)

  expected = input_gradient(lambda x: float64(x, training=False),
                            tf.float64).numpy()
  actual = tf.function(lambda: input_gradient(
      _function(model, prepared), tf.float32))().numpy()
  assert_close_float32(actual, expected, reduction, 2 * depth)


def test_the_folded_function_follows_the_weights():
  model = _with_trained_statistics(tiny_backbone(size=8, channels=2))
  folded = tf.function(folding.inference_function(model))
  images = tf.random.stateless_uniform([3, 8, 8, 2], (0, 0))
  before = folded(images).numpy()
  bn = model.get_layer("bn0")
  bn.moving_variance.assign(bn.moving_variance * 4.0)
  model.get_layer("conv0").bias.assign(model.get_layer("conv0").bias + 1.0)
  after = folded(images).numpy()
  expected = model(images, training=False).numpy()
  assert np.abs(after - before).max() > 1e-2
  assert_close_float32(after, expected, 9 * 2, 3)


def test_unknown_batch_size_and_large_kernels():
  """A traced batch of None, and a layer whose kernel outnumbers its
  output (the scale then multiplies the output)."""
  inputs = keras.Input((2, 2, 64))
  x = fgr_tf.backbones.layers.LayerFactory().conv(256, "conv")(inputs)
  x = fgr_tf.backbones.layers.LayerFactory().batch_norm("bn")(x)
  model = _with_trained_statistics(keras.Model(inputs, x))
  folded = tf.function(folding.inference_function(model),
                       input_signature=[tf.TensorSpec([None, 2, 2, 64])])
  for batch in (1, 3):
    images = tf.random.stateless_uniform([batch, 2, 2, 64], (batch, 0))
    assert_close_float32(folded(images).numpy(),
                         model(images, training=False).numpy(), 9 * 64, 2)


def test_what_is_not_folded_runs_as_the_model():
  """A convolution with an activation, or whose output is read twice, a
  float16 policy, and models that are not functional: unfolded, same
  outputs."""
  inputs = keras.Input((6, 6, 2))
  relu_conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu")
  shared = keras.layers.Conv2D(3, 3, padding="same")
  a = keras.layers.BatchNormalization()(relu_conv(inputs))
  s = shared(inputs)
  b = keras.layers.Add()([keras.layers.BatchNormalization()(s), s])
  model = _with_trained_statistics(keras.Model(inputs, [a, b]))
  assert folding.foldable_pairs(model) == {}
  images = tf.random.stateless_uniform([2, 6, 6, 2], (0, 1))
  for actual, expected in zip(folding.inference_function(model)(images),
                              model(images, training=False)):
    np.testing.assert_array_equal(actual.numpy(), expected.numpy())

  mixed = tiny_backbone(dtype="mixed_float16")
  assert folding.foldable_pairs(mixed) == {}

  def plain_function(images, training=None):
    return images * 2.0
  np.testing.assert_array_equal(
      folding.inference_function(plain_function)(images).numpy(),
      images.numpy() * 2.0)


def test_fgr_model_predicts_with_the_folded_function():
  backbone = _with_trained_statistics(tiny_backbone(size=8, channels=2))
  model = fgr_tf.FGRModel(backbone, fgr_lambda=1.0)
  images = tf.random.stateless_uniform([5, 8, 8, 2], (0, 2))
  expected = backbone(images, training=False).numpy()
  assert_close_float32(model.predict(images, verbose=0), expected, 18, 3)
  assert getattr(backbone, folding._CACHE_ATTRIBUTE, None) is not None


def test_folding_can_be_turned_off(monkeypatch):
  monkeypatch.setenv("FGR_TF_FOLD_BATCHNORM", "0")
  model = _with_trained_statistics(tiny_backbone(size=8, channels=2))
  assert len(folding.foldable_pairs(model)) == 1
  images = tf.random.stateless_uniform([3, 8, 8, 2], (0, 3))
  np.testing.assert_array_equal(
      folding.inference_function(model)(images).numpy(),
      model(images, training=False).numpy())


def test_attack_loops_carry_the_weights_read_once(monkeypatch):
  """A compiled attack reads, folds and transforms the weights once per
  call (`attacks.common.READ_WEIGHTS_ONCE`): its loop body reads only the
  unfolded layer's variables (the classifier's kernel and bias, not the 8
  convolutions' and BatchNorms' 40) and flips no kernel (VGG-11's two
  Winograd layers' input gradients); the flow's own channel reversals
  (its normalized -> pixel conversion and its gradient) run inside the
  XLA deform there (`common.DEFORM_BY_XLA`). Same attack either way."""
  images = tf.random.stateless_uniform([2, 32, 32, 3], (0, 1))
  labels = tf.constant([0, 1])
  ops, flows = {}, {}
  for read_once in (True, False):
    monkeypatch.setattr(fgr_tf.attacks.common, "READ_WEIGHTS_ONCE",
                        read_once)
    keras.utils.set_random_seed(0)
    model = _with_trained_statistics(
        fgr_tf.backbones.build("vgg11", 10, (32, 32, 3)))
    flows[read_once] = fgr_tf.attacks.flow_pgd(model, images, labels,
                                               steps=2).flow.numpy()
    (attack,) = getattr(model, "_fgr_tf_compiled_attacks").values()
    graph = attack.get_concrete_function(
        images, labels, tf.constant([0, 0]), tf.constant(0.01),
        tf.constant(0.005)).graph.as_graph_def()
    (body,) = [f for f in graph.library.function
               if f.signature.name.startswith("while_body")]
    ops[read_once] = [n.op for n in body.node_def]
  assert ops[True].count("ReadVariableOp") == 2
  assert ops[False].count("ReadVariableOp") >= 40
  assert ops[True].count("ReverseV2") == 0
  assert ops[False].count("ReverseV2") == 4
  # The same steps: the gradients' signs agree (up to entries whose
  # gradient is at float32 round-off, none here).
  assert np.abs(flows[True]).max() > 0
  np.testing.assert_array_equal(flows[True], flows[False])


def test_relus_before_max_pools_are_swapped_only_when_alone(monkeypatch):
  """VGG-11's five and the small CNN's two pools follow a ReLU; the
  prepared function pools first (its ReLU then runs on the pooled map). A
  ReLU whose output also feeds another layer is not swapped. (The first
  block as TF ops: `first_block.block` runs its ReLU inside XLA.)"""
  monkeypatch.setattr(first_block, "BLOCK", "ops")
  for name, shape, pools in (("vgg11", (32, 32, 3), 5),
                             ("small_cnn", (12, 12, 1), 2)):
    model = fgr_tf.backbones.build(name, 10, shape)
    assert len(folding.relu_pool_pairs(model)) == pools
  inputs = keras.Input((4, 4, 2))
  relu = keras.layers.ReLU()(inputs)
  pooled = keras.layers.MaxPooling2D(2)(relu)
  branch = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(2, 1)(relu))
  model = keras.Model(inputs, keras.layers.Add()([pooled, branch]))
  assert not folding.relu_pool_pairs(model)

  model = _with_trained_statistics(
      fgr_tf.backbones.build("small_cnn", 10, (12, 12, 1)))
  graph = tf.function(_function(model, True)).get_concrete_function(
      tf.TensorSpec([4, 12, 12, 1])).graph
  relu_inputs = [op.inputs[0].shape.as_list() for op in graph.get_operations()
                 if op.type == "Relu"]
  # conv0's ReLU on its pooled 6x6 map, conv1's on 3x3, fc's on [4, 128].
  assert [4, 6, 6, 32] in relu_inputs and [4, 3, 3, 64] in relu_inputs
  assert [4, 12, 12, 32] not in relu_inputs


def test_prepared_vgg_under_xla_equals_graph():
  """The attacks under XLA (the GPU default) run the prepared function
  compiled, its XLA pieces (Winograd's 4x4 and 8x8 transforms, the first
  layer's input gradient) nested: same logits and input gradients as in a
  graph, to float32 round-off."""
  name, shape, _, reduction, depth = BACKBONES[0]
  keras.utils.set_random_seed(0)
  model = _with_trained_statistics(fgr_tf.backbones.build(name, 10, shape))
  images = tf.constant(np.random.default_rng(3).uniform(size=(2,) + shape),
                       tf.float32)

  def logits_and_gradient(x):
    function = folding.prepared_inference_function(model)()
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = function(x)
      loss = tf.reduce_sum(logits[:, 0])
    return logits, tape.gradient(loss, x)

  graph = tf.function(logits_and_gradient)(images)
  xla = tf.function(logits_and_gradient, jit_compile=True)(images)
  assert_close_float32(xla[0].numpy(), graph[0].numpy(), reduction, depth)
  assert_close_float32(xla[1].numpy(), graph[1].numpy(), reduction,
                       2 * depth)
  assert np.abs(graph[1].numpy()).max() > 0


def test_a_varying_batch_keeps_the_8x8_layers_on_onednn():
  """Attacks on shrinking active sets (ADef, worst-of-k) prepare without
  XLA-compiled pieces, which would compile once per batch size: oneDNN at
  8x8, Winograd's matrix transforms at 4x4 (XLA's at a fixed batch)."""
  model = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))

  def input_gradient_ops(varying_batch):
    function = folding.prepared_inference_function(model)(varying_batch)

    def input_gradient(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(function(x))
      return tape.gradient(total, x)

    graph = tf.function(input_gradient).get_concrete_function(
        tf.TensorSpec([None, 32, 32, 3])).graph
    types = [op.type for op in graph.get_operations()]
    xla_calls = sum(1 for op in graph.get_operations()
                    if "_XlaMustCompile" in op.node_def.attr)
    return types, xla_calls

  (fixed, fixed_xla), (varying, varying_xla) = (input_gradient_ops(False),
                                                input_gradient_ops(True))
  assert fixed_xla > 0 and varying_xla == 0
  # TF's input gradients for VGG-11's two 8x8 layers, whose forward
  # convolutions are TF's too, and the first layer's input gradient by
  # TF ops (`few_channels.input_gradient_by_ops`: one more convolution).
  assert (varying.count("Conv2DBackpropInput") ==
          fixed.count("Conv2DBackpropInput") + 2)
  assert varying.count("Conv2D") == fixed.count("Conv2D") + 3
  # The 4x4 layers' products (forward, input gradient and the traced
  # kernel gradient, which the run prunes): one batched matmul each in the
  # matrix form, plain matmuls in the XLA form.
  assert varying.count("BatchMatMulV2") == 2 * 3
  assert fixed.count("BatchMatMulV2") == 0
