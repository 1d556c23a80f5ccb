"""Inference with each BatchNorm folded into the convolution before it.

In inference mode a BatchNorm is a per-channel affine map,
  bn(z) = gamma (z - mean) / sqrt(var + eps) + beta = s z + t,
so after a convolution with kernel K and bias b
  bn(conv(x, K) + b) = conv(x, s K) + (s b + t):
one convolution with a scaled kernel and a bias, which oneDNN fuses with
the ReLU after it. The BatchNorm's own pass over the activations (forward,
and backward in the attacks) disappears. Measured (`bench.profile_ops
--mode eval`, VGG-11, batch 128, ONEDNN_MAX_CPU_ISA=AVX2, Xeon): the
BatchNorm passes were 16% of an inference forward pass.

`inference_function(model)` returns `images -> logits` computing the same
function as `model(images, training=False)` (to float32 rounding: s K and
s b + t are rounded once more), with the scaled kernels computed from the
model's current variables at every call (so it follows training);
`prepared_inference_function(model)` is its form for loops (the attacks),
which reads and transforms the weights once, outside the loop, and pools
before the ReLUs that feed a max pooling alone (`relu_pool_pairs`; on the
quickstart CNN, ADef's ReLU backward passes, which pfor tiles over the
candidate classes, took 66 instead of 253 ms of op time per batch of 250,
the attack 0.0045 instead of 0.0052 s per image; flow-PGD's 72 instead of
200 ms per 100 steps, less 95 ms for the forward ReLUs no longer fused
into the convolutions). Folded are (convolution, BatchNorm) pairs of a
functional model where the convolution feeds that BatchNorm only, has no
activation, and both run in float32 or float64; everything else runs as
the model's own layers.
Models that are not functional Keras models, or Keras versions without the
functional graph API used here, run unfolded; so does everything when the
environment variable FGR_TF_FOLD_BATCHNORM is "0" (read when a model's
function is first built).
"""

from absl import logging
import keras
import tensorflow as tf

from fgr_tf import environment
from fgr_tf.backbones import few_channels
from fgr_tf.backbones import first_block
from fgr_tf.backbones import pooling

_CACHE_ATTRIBUTE = "_fgr_tf_folded_inference"
_FLOAT_DTYPES = ("float32", "float64")


def _single_consumer_input(layer):
  """The layer whose output is `layer`'s only input, or None."""
  nodes = getattr(layer, "_inbound_nodes", None)
  if not nodes or len(nodes) != 1:
    return None
  parents = nodes[0].parent_nodes
  if len(parents) != 1 or len(nodes[0].input_tensors) != 1:
    return None
  return parents[0].operation


def foldable_pairs(model):
  """{id(conv): (conv, bn)} for the model's foldable (Conv2D, BatchNorm)
  pairs (see the module docstring); {} if there are none or the model's
  graph cannot be read."""
  pairs = {}
  for bn in getattr(model, "layers", ()):
    if not isinstance(bn, keras.layers.BatchNormalization):
      continue
    conv = _single_consumer_input(bn)
    if not isinstance(conv, keras.layers.Conv2D):
      continue
    if (len(getattr(conv, "_inbound_nodes", ())) != 1 or
        len(getattr(conv, "_outbound_nodes", ())) != 1 or
        conv.activation not in (None, keras.activations.linear) or
        getattr(conv, "quantization_mode", None) is not None or
        conv.data_format != "channels_last" or
        bn.axis not in (-1, 3) or getattr(bn, "renorm", False) or
        conv.compute_dtype not in _FLOAT_DTYPES or
        bn.compute_dtype not in _FLOAT_DTYPES):
      continue
    pairs[id(conv)] = (conv, bn)
  return pairs


def _is_plain_relu(layer):
  return (isinstance(layer, keras.layers.ReLU) and layer.max_value is None
          and not layer.negative_slope and not layer.threshold)


def relu_pool_pairs(model):
  """{id(pool): (relu, pool)} for the model's ReLU layers whose output is
  the only input of a max pooling and feeds nothing else: the prepared
  function pools first (max pooling and ReLU commute, so the values are
  the same; so are the gradients, which pass where the window's first
  maximum is positive either way), and the ReLU's backward pass runs on
  the pooled map, a quarter of the size for 2x2 pools."""
  pairs = {}
  for pool in getattr(model, "layers", ()):
    if not isinstance(pool, keras.layers.MaxPooling2D):
      continue
    relu = _single_consumer_input(pool)
    if (_is_plain_relu(relu) and
        len(getattr(relu, "_inbound_nodes", ())) == 1 and
        len(getattr(relu, "_outbound_nodes", ())) == 1 and
        len(getattr(pool, "_inbound_nodes", ())) == 1):
      pairs[id(pool)] = (relu, pool)
  return pairs


def _pool_then_relu(pool):
  def call(inputs, **unused_kwargs):
    return tf.nn.relu(pool(inputs))
  return call


def first_block_layers(model):
  """(conv, pool) of the model's first block (`first_block`: the model's
  only input feeds only a Conv2D whose BatchNorm folds into it
  (`foldable_pairs`) and feeds only a ReLU that feeds a max pooling alone
  (`relu_pool_pairs`), so the images reach the rest of the model through
  the pool's output only), or None."""
  pairs = foldable_pairs(model)
  for relu, pool in relu_pool_pairs(model).values():
    bn = _single_consumer_input(relu)
    conv = _single_consumer_input(bn)
    if (conv is None or pairs.get(id(conv), (None, None))[1] is not bn or
        len(getattr(bn, "_outbound_nodes", ())) != 1):
      continue
    source = _single_consumer_input(conv)
    if (isinstance(source, keras.layers.InputLayer) and
        len(getattr(source, "_outbound_nodes", ())) == 1 and
        len(getattr(model, "inputs", ())) == 1):
      return conv, pool
  return None


def _recording_conv(call, kernel):
  """`call` (the first block's folded convolution), filling an active
  `first_block.record()` with its input, output and kernel."""
  def run(inputs, **unused_kwargs):
    outputs = call(inputs)
    entry = first_block.recording()
    if entry is not None and entry.pool_input is None:
      entry.inputs, entry.pool_input, entry.kernel = inputs, outputs, kernel
    return outputs
  return run


def _recording_pool_then_relu(pool):
  """`_pool_then_relu(pool)` for the first block's pool, completing the
  `first_block.record()` entry its convolution started."""
  call = _pool_then_relu(pool)

  def run(inputs, **unused_kwargs):
    outputs = call(inputs)
    entry = first_block.recording()
    if entry is not None and entry.pool_input is inputs:
      entry.outputs, entry.pool_size = outputs, tuple(pool.pool_size)
    return outputs
  return run


def _fused_first_block(call, dtype, output_dtype):
  """`first_block.block` as the first block's pool operation (its
  convolution, BatchNorm and ReLU run as identities)."""
  def run(inputs, **unused_kwargs):
    return tf.cast(call(tf.cast(inputs, dtype)), output_dtype)
  return run


def _scale_and_shift(conv, bn, dtype):
  """(s [C], s b + t [C]) of the module docstring, in `dtype`."""
  def read(variable):
    return tf.cast(tf.convert_to_tensor(variable), dtype)
  scale = tf.math.rsqrt(read(bn.moving_variance) + bn.epsilon)
  if bn.scale:
    scale = scale * read(bn.gamma)
  shift = -read(bn.moving_mean) * scale
  if bn.center:
    shift = shift + read(bn.beta)
  if conv.use_bias:
    shift = shift + read(conv.bias) * scale
  return scale, shift


def _folded_conv(conv, bn):
  """conv + bn as one convolution: the scale goes into the kernel, or, when
  the kernel has more entries than the output (small maps, e.g. VGG's
  2x2x512 layers: 2.4M weights, 0.26M outputs at batch 128), onto the
  output, whichever multiplies fewer numbers (the kernel is scaled at
  every call, so that the function follows training)."""
  def call(inputs, **unused_kwargs):
    # As the layers' __call__: inputs in the conv's compute dtype, outputs
    # in the BatchNorm's.
    inputs = tf.cast(inputs, conv.compute_dtype)
    scale, shift = _scale_and_shift(conv, bn, inputs.dtype)
    kernel = tf.cast(tf.convert_to_tensor(conv.kernel), inputs.dtype)
    outputs = tf.TensorShape(
        conv.compute_output_shape(inputs.shape)).num_elements()  # None: any
    if outputs is not None and outputs < kernel.shape.num_elements():
      y = conv.convolution_op(inputs, kernel) * scale
    else:
      y = conv.convolution_op(inputs, kernel * scale)
    return tf.cast(tf.nn.bias_add(y, shift), bn.compute_dtype)
  return call


def _prepared_folded_conv(conv, bn, varying_batch):
  """`_folded_conv` with the weights read, scaled and prepared
  (`gemm_conv.Conv2D.prepared_convolution_op`: Winograd's kernel
  transforms) now, once; the scale always goes into the kernel (a cost
  paid once, not per call). A first layer (few input channels) takes
  `few_channels.conv_with_bias` (its input gradient by a matmul).
  `varying_batch`: no XLA-compiled pieces (XLA compiles once per batch
  size): the first layer's gradient by TF ops, and no `gemm_conv.Conv2D.
  prepared_convolution_op`'s `xla`."""
  dtype = conv.compute_dtype
  scale, shift = _scale_and_shift(conv, bn, dtype)
  kernel = tf.cast(tf.convert_to_tensor(conv.kernel), dtype) * scale
  # The convolution's input shape in the model's graph.
  # pylint: disable-next=protected-access
  inputs_shape = conv._inbound_nodes[0].input_tensors[0].shape
  prepare = getattr(conv, "prepared_convolution_op", None)
  few = few_channels.applies(conv, inputs_shape, dtype)
  if few:
    with_bias = few_channels.conv_with_bias(kernel, shift,
                                            xla=not varying_batch)
  elif prepare is not None:
    convolution = prepare(kernel, inputs_shape, xla=not varying_batch)
    with_bias = lambda inputs: tf.nn.bias_add(convolution(inputs), shift)
  else:
    with_bias = lambda inputs: tf.nn.bias_add(
        conv.convolution_op(inputs, kernel), shift)

  def call(inputs, **unused_kwargs):
    return tf.cast(with_bias(tf.cast(inputs, dtype)), bn.compute_dtype)
  return call, ((kernel, shift) if few else None)


def _identity(inputs, **unused_kwargs):
  return inputs


def _unfolded(model):
  return lambda images: model(images, training=False)


def inference_function(model):
  """`images -> model(images, training=False)` with BatchNorms folded.

  Cached on the model (an untracked attribute), so repeated calls reuse
  one function.

  Args:
    model: a Keras model (or any callable taking `training=`).

  Returns:
    A callable mapping [B, H, W, C] images to the model's outputs.
  """
  return _cached(model, _CACHE_ATTRIBUTE, lambda: _build(model, False))


def prepared_inference_function(model):
  """`inference_function` for loops: returns `prepare`, a callable that
  reads the model's weights and does the work that depends on them alone
  (the folding, Winograd's kernel transforms) when it is called, and
  returns `images -> outputs` applying them. Call `prepare()` outside a
  `tf.while_loop` and the returned function inside it: the loop then
  carries that work as loop-invariant tensors instead of redoing it at
  every iteration (the attacks: `attacks.common.compiled`). Same values as
  `inference_function` to float32 rounding (the scale always goes into
  the kernel). Cached on the model like `inference_function`.
  `prepare(varying_batch=True)` for loops whose batch size changes
  between iterations (XLA would compile its pieces once per size).
  """
  return _cached(model, _PREPARED_CACHE_ATTRIBUTE,
                 lambda: _build(model, True))


_PREPARED_CACHE_ATTRIBUTE = "_fgr_tf_prepared_inference"


def _cached(model, attribute, build):
  cached = getattr(model, attribute, None)
  if cached is not None:
    return cached
  function = build()
  try:
    object.__setattr__(model, attribute, function)
  except (AttributeError, TypeError):
    pass
  return function


def _build(model, prepared):
  """The folded function (`prepared`: its `prepare` callable)."""
  pairs = foldable_pairs(model)
  if not pairs or not environment.switch("FGR_TF_FOLD_BATCHNORM"):
    return ((lambda varying_batch=False: _unfolded(model)) if prepared
            else _unfolded(model))
  try:
    # pylint: disable-next=g-import-not-at-top
    from keras.src.models import functional
    keras_operation_fn = functional.operation_fn
    # pylint: disable=protected-access
    run_through_graph = model._run_through_graph
    standardize_inputs = model._standardize_inputs  # e.g. cast to Input dtype
    # pylint: enable=protected-access
  except (ImportError, AttributeError):
    logging.warning("This Keras has no functional graph API that fgr_tf "
                    "knows: inference runs with unfolded BatchNorms.")
    return ((lambda varying_batch=False: _unfolded(model)) if prepared
            else _unfolded(model))
  folded_bns = {id(bn) for _, bn in pairs.values()}
  # Pooled before their ReLU (`relu_pool_pairs`): in the prepared function.
  swapped = relu_pool_pairs(model) if prepared else {}
  swapped_relus = {id(relu) for relu, _ in swapped.values()}

  def with_convolutions(convolutions):
    """images -> outputs, each folded pair running convolutions[id(conv)]."""
    def operation_fn(operation):
      if id(operation) in convolutions:  # and the first block's pool
        return convolutions[id(operation)]
      if id(operation) in folded_bns or id(operation) in swapped_relus:
        return _identity
      if id(operation) in swapped:
        return _pool_then_relu(operation)
      return keras_operation_fn(operation, training=False)

    @tf.autograph.experimental.do_not_convert
    def function(images):
      return run_through_graph(standardize_inputs(images),
                               operation_fn=operation_fn)

    return function

  if not prepared:
    return with_convolutions(
        {key: _folded_conv(*pair) for key, pair in pairs.items()})

  block = first_block_layers(model)

  @tf.autograph.experimental.do_not_convert
  def prepare(varying_batch=False):
    operations = {}
    for key, pair in pairs.items():
      operations[key], few_channels_weights = _prepared_folded_conv(
          *pair, varying_batch)
      if (block is None or pair[0] is not block[0] or
          few_channels_weights is None or not pooling.applies(
              block[1].input.shape, block[1].pool_size, block[1].strides,
              block[1].padding, block[1].data_format)):
        continue
      kernel, shift = few_channels_weights
      if (not varying_batch and first_block.gray(kernel) and
          first_block.BLOCK == "xla"):
        # The block as one operation, run where its pool was.
        operations[key] = _identity
        operations[id(block[1])] = _fused_first_block(
            first_block.block(kernel, shift, block[1].pool_size),
            kernel.dtype, pair[1].compute_dtype)
      else:
        operations[key] = _recording_conv(operations[key], kernel)
        operations[id(block[1])] = _recording_pool_then_relu(block[1])
    return with_convolutions(operations)

  return prepare
