"""Is the FGR objective's gradient exact on this execution path?

Compares the parameter gradients of `ce + fgr_lambda * FGR (+ igr_lambda *
IGR)` computed by a float32 backbone on some execution path (graph, XLA,
tf.distribute replicas, ...) with a float64 run of the same backbone and
weights, error / max |reference| per weight tensor.

One subtlety decides what "the same" means. A ReLU network's gradient is a
piecewise function of its inputs: each ReLU unit and each max-pool window
takes a branch (on/off, which element wins), and the gradient jumps where
a branch changes. float32 rounding moves pre-activations by ~1e-5 of their
scale, so units that sit that close to zero can take the other branch in
float32 than in float64. ResNet-18 at batch 8 has ~4.5 million ReLU units
and, on random inputs, typically ~10 of them flip; each flip changes the
gradient by up to ~10% of its largest entry (measured). That is float32
itself, not an implementation error, and it is equally present in the
PyTorch original. So the reference is computed in float64 on the SAME
branches as the float32 run: the ReLU masks and max-pool winners recorded
from the float32 run are replayed in the float64 one. What remains is the
rounding error of the smooth parts, which a correct path keeps at ~1e-5;
what an implementation error (a pooling whose two derivatives pick
different elements, a variance that cancels) adds is much larger.
`compare` reports both errors and the number of flipped units.

Supported backbones: functional `keras.Model`s whose only non-smooth layers
are `keras.layers.ReLU` and non-overlapping max pools (every
`fgr_tf.backbones` backbone). Used by tests/test_exactness.py and
`python -m bench.exactness` (the README's table).
"""

import keras
import numpy as np
import tensorflow as tf

from fgr_tf import errors
from fgr_tf import regularizers
from fgr_tf.backbones import pooling


def branch_layers(backbone):
  """The layers whose outputs are non-smooth in their inputs.

  Returns:
    [(layer, kind)] with kind "relu" or "max_pool", in the model's order.

  Raises:
    ValueError: a layer with a built-in non-linear activation, or a pooling
      this module cannot replay.
  """
  found = []
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.ReLU):
      if (layer.max_value is not None or layer.negative_slope or
          layer.threshold):
        raise errors.UserError(
            f"{layer.name}: only plain ReLU can be replayed.")
      found.append((layer, "relu"))
    elif isinstance(layer, keras.layers.MaxPooling2D):
      if not pooling.applies((None, 2, 2, 1), layer.pool_size, layer.strides,
                             layer.padding, layer.data_format):
        raise errors.UserError(f"{layer.name}: only non-overlapping 'valid' "
                               "max pooling can be replayed.")
      found.append((layer, "max_pool"))
    else:
      activation = getattr(layer, "activation", None)
      if activation not in (None, keras.activations.linear):
        raise errors.UserError(
            f"{layer.name} has a built-in activation: use a separate "
            "keras.layers.ReLU layer so its branches can be recorded.")
  return found


def _probe(backbone):
  """A model sharing `backbone`'s layers that also returns the inputs of
  its branch layers: (logits, [branch inputs])."""
  points = branch_layers(backbone)
  return keras.Model(backbone.inputs,
                     [backbone.outputs[0]] + [l.input for l, _ in points])


def _gradient_fn(model, num_branches=None):
  """fn(images, labels, global_batch, fgr_lambda, igr_lambda) -> (gradients,
  branch inputs, cotangents) of the objective, for a probe-like `model`
  returning (logits, [extras]): the first `num_branches` extras (all when
  None) are branch inputs, the others layer outputs whose cotangents
  (d objective / d output, through every path) fn returns third."""

  def fn(images, labels, global_batch, fgr_lambda, igr_lambda):
    extras = []

    def logits_only(x, training):
      outputs = model(x, training=training)
      if not isinstance(outputs, (list, tuple)):  # a model without branches
        return outputs
      extras.extend(outputs[1:])
      return outputs[0]

    with tf.GradientTape() as tape:
      ce, input_grad, _ = regularizers.loss_and_input_gradient(
          logits_only, images, labels, True, global_batch)
      flow_grad = regularizers.flow_gradient_from_input_gradient(
          images, input_grad)
      fgr = regularizers.penalty_from_flow_gradient(flow_grad, global_batch)
      igr = regularizers.input_penalty_from_input_gradient(input_grad,
                                                           global_batch)
      total = (ce + tf.cast(fgr_lambda, fgr.dtype) * fgr +
               tf.cast(igr_lambda, igr.dtype) * igr)
    branches = len(extras) if num_branches is None else num_branches
    weights = model.trainable_weights
    both = tape.gradient(total, weights + extras[branches:])
    return both[:len(weights)], extras[:branches], both[len(weights):]

  return fn


def make_path(backbone, jit_compile=False, strategy=None):
  """The objective's parameter gradients on one execution path.

  Args:
    backbone: float32 (or mixed-precision) functional keras.Model (built
      in `strategy`'s scope if one is given).
    jit_compile: compile the step with XLA.
    strategy: optional tf.distribute strategy; the batch is split evenly
      over its replicas, each replica computes its share of the GLOBAL
      objective inside one (XLA) function and the gradients are summed, as
      `FGRModel.train_step` under Keras's `fit` does.

  Returns:
    `gradients(images, labels, fgr_lambda=300, igr_lambda=0)` -> (list of
    float64 arrays in `backbone.trainable_weights` order, list of float64
    arrays: the inputs of each branch layer for the whole batch). Images
    [B, H, W, C] float32 in [0, 1], labels [B] ints; the penalty weights
    are in the original's units. Traced once per batch shape.
  """
  probe = _probe(backbone)
  step = _gradient_fn(probe)
  if strategy is None:
    compiled = tf.function(step, jit_compile=jit_compile)
  else:
    # As Keras's train function: strategy.run inside one (XLA) function.
    @tf.function(jit_compile=jit_compile)
    def compiled(inputs, global_batch, fgr_lambda, igr_lambda):
      return strategy.run(
          lambda xy: step(xy[0], xy[1], global_batch, fgr_lambda, igr_lambda),
          args=(inputs,))

  def gradients(images, labels, fgr_lambda=300.0, igr_lambda=0.0):
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    batch = int(images.shape[0])
    lambdas = (tf.constant(fgr_lambda, tf.float32),
               tf.constant(igr_lambda, tf.float32))
    if strategy is None:
      grads, extras, _ = compiled(images, labels, batch, *lambdas)
      return ([np.asarray(g, np.float64) for g in grads],
              [np.asarray(e, np.float64) for e in extras])
    replicas = strategy.num_replicas_in_sync
    if batch % replicas:
      raise errors.UserError(f"batch {batch} is not divisible by {replicas} "
                       "replicas")
    share = batch // replicas

    def split(ctx):
      start = ctx.replica_id_in_sync_group * share
      return images[start:start + share], labels[start:start + share]

    inputs = strategy.experimental_distribute_values_from_function(split)
    grads, extras, _ = compiled(inputs, batch, *lambdas)
    local = strategy.experimental_local_results
    return ([np.sum([np.asarray(v, np.float64) for v in local(g)], axis=0)
             for g in grads],
            [np.concatenate([np.asarray(v, np.float64) for v in local(e)])
             for e in extras])

  return gradients


def briefly_train(backbone, gradients, images, labels, steps=5,
                  learning_rate=0.01, fgr_lambda=None):
  """A few plain SGD steps of the FGR objective on one batch, in place,
  with a path's `gradients` (see `make_path`; no extra tracing): the
  'trained weights' family (non-random weights, moved BatchNorm
  statistics). fgr_lambda defaults to 100 at batch 128, scaled by
  (B / 128)^2 like the penalty (which holds the batch mean's 1/B twice),
  so that small batches do not diverge."""
  if fgr_lambda is None:
    fgr_lambda = 100.0 * (len(images) / 128) ** 2
  for _ in range(steps):
    grads, _ = gradients(images, labels, fgr_lambda)
    if not all(np.all(np.isfinite(g)) for g in grads):
      raise FloatingPointError("briefly_train diverged")
    for weight, grad in zip(backbone.trainable_weights, grads):
      weight.assign_sub(learning_rate * grad.astype(np.float32))
  return backbone


class _Replay(keras.layers.Layer):
  """A ReLU or max pool that follows recorded branch decisions.

  `decision` (set before tracing) is the 0/1 mask of the ReLU, or the
  [B, Ho, ph, Wo, pw, C] winner mask of the pool; while it is None the
  layer behaves normally (for building).
  """

  def __init__(self, kind, pool_size=None, **kwargs):
    super().__init__(**kwargs)
    self.kind = kind
    self.pool_size = pool_size
    self.decision = None

  def call(self, x):
    if self.kind == "relu":
      if self.decision is None:
        return tf.nn.relu(x)
      return x * tf.constant(self.decision, x.dtype)
    if self.decision is None:
      return tf.nn.max_pool2d(x, self.pool_size, self.pool_size, "VALID")
    windows = pooling.windows(x, self.pool_size)
    return tf.reduce_sum(windows * tf.constant(self.decision, x.dtype),
                         axis=[2, 4])


def _float64_layer(layer, replay):
  config = layer.get_config()
  config["dtype"] = "float64"
  if layer.name in replay:
    kind = replay[layer.name]
    return _Replay(kind, tuple(layer.pool_size) if kind == "max_pool" else None,
                   name=layer.name, dtype="float64")
  return layer.__class__.from_config(config)


def float64_twin(backbone, replay_branches=True):
  """A float64 copy of `backbone` (same weights, cast), whose branch layers
  can replay decisions (see `set_branches`)."""
  replay = ({l.name: kind for l, kind in branch_layers(backbone)}
            if replay_branches else {})
  inputs = keras.Input(backbone.input_shape[1:], dtype="float64")
  twin = keras.models.clone_model(
      backbone, input_tensors=inputs,
      clone_function=lambda layer: _float64_layer(layer, replay))
  twin.set_weights([np.asarray(w, np.float64) for w in backbone.get_weights()])
  return twin


def branch_decisions(backbone, branch_inputs):
  """{layer name: decision} from recorded branch-layer inputs (float32 run):
  ReLU mask = input > 0; pool = first maximum of each window."""
  decisions = {}
  for (layer, kind), values in zip(branch_layers(backbone), branch_inputs):
    x = tf.constant(values)
    if kind == "relu":
      decisions[layer.name] = (values > 0).astype(np.float64)
    else:
      size = tuple(layer.pool_size)
      pooled = tf.nn.max_pool2d(x, size, size, "VALID")
      decisions[layer.name] = pooling.first_max_mask(
          pooling.windows(x, size), pooled).numpy()
  return decisions


def reference_gradients(twin, images, labels, fgr_lambda=300.0,
                        igr_lambda=0.0, decisions=None):
  """float64 gradients of the objective with `twin` (see `float64_twin`),
  on the given branch decisions (None: float64's own).

  Returns:
    (gradients, branch inputs, bias terms): the first two as `make_path`'s
    function; bias terms {bias weight path: [C] float64}: for each layer
    with a bias, sum over batch and pixels of |d objective / d its output|
    per channel, the magnitude of the terms its bias gradient sums.
  """
  for layer in twin.layers:
    if isinstance(layer, _Replay):
      layer.decision = None if decisions is None else decisions[layer.name]
  probe, num_branches, biases = _probe_twin(twin)
  # Eagerly: run once, a graph's trace and optimization would cost 2-4x the
  # run (VGG-19: 2.5 s against 7 s); the two agree to float64 round-off.
  step = _gradient_fn(probe, num_branches)
  grads, extras, cotangents = step(
      tf.cast(images, tf.float64), tf.cast(labels, tf.int32),
      int(images.shape[0]), tf.constant(fgr_lambda, tf.float64),
      tf.constant(igr_lambda, tf.float64))
  terms = {}
  for name, cotangent in zip(biases, cotangents):
    cotangent = np.abs(cotangent.numpy())
    terms[name] = cotangent.reshape(-1, cotangent.shape[-1]).sum(axis=0)
  return ([g.numpy() for g in grads], [e.numpy() for e in extras], terms)


def _probe_twin(twin):
  """(probe returning (logits, [branch inputs] + [outputs of layers with a
  bias]), number of branch inputs, [those layers' bias weight paths])."""
  points = [l for l in twin.layers if isinstance(l, _Replay)]
  biased = [l for l in twin.layers
            if getattr(l, "use_bias", False) and l.trainable]
  probe = keras.Model(twin.inputs, [twin.outputs[0]] +
                      [l.input for l in points] + [l.output for l in biased])
  return probe, len(points), [l.bias.path for l in biased]


def relative_errors(gradients, reference, names, bias_terms=None):
  """({name: max |g - ref| / max |ref|}, {name: zero error}) per tensor.

  The second dict holds the tensors whose gradient is ZERO in exact
  arithmetic (max |ref| < 1e-6 G, G = the model's largest gradient entry):
  the bias of a convolution that BatchNorm follows (BatchNorm removes any
  constant). A relative error means nothing there: float32 computes the
  round-off of a sum of upstream cotangents that cancels. Its error is
  reported against the magnitude of the terms it sums (tests/helpers.py's
  convention for results that cancel): per channel, max |g_c - ref_c| /
  sum over batch and pixels of |d objective / d layer output|_c, from
  `bias_terms` (see `reference_gradients`); a BatchNorm that failed to
  remove the constant would give O(1) there, round-off ~u sqrt(B H W).
  Tensors without bias terms are reported against G.
  """
  overall = max(float(np.max(np.abs(r))) for r in reference)
  bias_terms = bias_terms or {}
  errors, zeros = {}, {}
  for name, g, r in zip(names, gradients, reference):
    scale = float(np.max(np.abs(r)))
    if scale >= 1e-6 * overall:
      errors[name] = float(np.max(np.abs(g - r))) / scale
    elif name in bias_terms:
      terms = bias_terms[name]
      # A channel no path reaches has exact zeros on both sides.
      zeros[name] = float(np.max(np.abs(g - r) / np.where(
          terms > 0, terms, overall)))
    else:
      zeros[name] = float(np.max(np.abs(g - r))) / overall
  return errors, zeros


def compare(backbone, gradients, images, labels, fgr_lambda=300.0,
            igr_lambda=0.0, own_branches=True):
  """A float32 path against the float64 reference.

  Args:
    backbone: the float32 backbone.
    gradients: its path (`make_path(backbone, ...)`).
    images, labels, fgr_lambda, igr_lambda: the case.
    own_branches: also compare with float64 on its own branches (one more
      float64 run), for "raw_error" and "flips".

  Returns:
    dict with "error" (worst relative error against the float64 run on the
    float32 run's branches: the implementation's error), "tensor" (where),
    "errors" (per tensor, on the same branches), "zero_error" (the worst
    of the tensors whose exact gradient is zero, against the magnitude of
    the terms their sums cancel; see `relative_errors`), and with
    `own_branches`:
    "raw_error" (against float64's own branches) and "flips" (ReLU units
    and pool windows that took a different branch in float32).
  """
  grads, extras = gradients(images, labels, fgr_lambda, igr_lambda)
  if not all(np.all(np.isfinite(g)) for g in grads):
    raise FloatingPointError("the float32 gradients are not finite")
  twin = float64_twin(backbone)
  names = [w.path for w in backbone.trainable_weights]
  decisions32 = branch_decisions(backbone, extras)
  same, _, bias_terms = reference_gradients(twin, images, labels, fgr_lambda,
                                           igr_lambda, decisions32)
  errors, zeros = relative_errors(grads, same, names, bias_terms)
  worst = max(errors, key=errors.get)
  result = {"error": errors[worst], "tensor": worst, "errors": errors,
            "zero_error": max(zeros.values(), default=0.0)}
  if own_branches:
    own, own_extras, _ = reference_gradients(twin, images, labels,
                                             fgr_lambda, igr_lambda)
    decisions64 = branch_decisions(backbone, own_extras)
    flips = 0
    for layer, kind in branch_layers(backbone):
      changed = int(np.sum(decisions32[layer.name] != decisions64[layer.name]))
      flips += changed if kind == "relu" else changed // 2  # 2 per window
    result["raw_error"] = max(relative_errors(grads, own, names)[0].values())
    result["flips"] = flips
  return result


def case_images(kind, batch, input_shape, seed=0, fashion_mnist=None):
  """A batch of test images and labels of one input family.

  Args:
    kind: "uniform" (i.i.d. U[0, 1) pixels) or "fashion_mnist" (real
      images: `fashion_mnist`, uint8 [N, 28, 28], zero-padded to the input
      size and repeated over channels; many exact zeros, hence tied
      max-pool windows and dead ReLUs).
    batch: number of images B.
    input_shape: (H, W, C).
    seed: selects the images (uniform) or the offset into the data set.
    fashion_mnist: see kind.

  Returns:
    (images [B, H, W, C] float32 in [0, 1], labels [B] int32 in [0, 10)).
  """
  height, width, channels = input_shape
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  if kind == "uniform":
    return (rng.random((batch,) + tuple(input_shape)).astype(np.float32),
            labels)
  if kind != "fashion_mnist":
    raise errors.UserError(f"Unknown input family {kind!r}.")
  start = (seed * batch) % max(len(fashion_mnist) - batch + 1, 1)
  images = fashion_mnist[start:start + batch].astype(np.float32) / 255.0
  if len(images) < batch:
    raise errors.UserError(f"fashion_mnist holds {len(fashion_mnist)} images; "
                     f"need {batch}.")
  top, left = (height - 28) // 2, (width - 28) // 2
  if top < 0 or left < 0:
    images = images[:, -top if top < 0 else 0:, -left if left < 0 else 0:]
    images = images[:, :height, :width]
    top, left = max(top, 0), max(left, 0)
  images = np.pad(images, [(0, 0), (top, height - top - images.shape[1]),
                           (left, width - left - images.shape[2])])
  return np.repeat(images[..., None], channels, axis=-1), labels
