"""What every attack shares: what it is (`AttackInfo`), the result record,
input checks, the clipped warp, losses, flow norms, compilation."""

import contextlib
import dataclasses
import functools
import threading
import typing

from absl import logging
import tensorflow as tf

from fgr_tf import environment
from fgr_tf import errors
from fgr_tf import validation
from fgr_tf import warp
from fgr_tf.backbones import folding
from fgr_tf.backbones import pooling

KINDS = ("bounded", "minimal")


@dataclasses.dataclass(frozen=True)
class AttackInfo:
  """What an attack module declares about its attack (its `INFO`).

  Attributes:
    function: `function(model, images, labels, **settings) -> AttackResult`;
      every setting is a keyword argument with a default, including
      `jit_compile`.
    kind: "bounded" (the best attack within a budget: robust accuracy is
      the measure; e.g. flow-PGD, worst-of-k) or "minimal" (the smallest
      deformation that fools the model: success is ~100% and its size, the
      T-norm in pixels, is the measure; stAdv, ADef).
    trains: whether it can serve adversarial training (runs inside a
      compiled training step, takes a stateless `seed` if random).
    budget: for bounded attacks, the setting that is the budget (e.g.
      "epsilon"), for robust-accuracy-versus-budget curves; else None.
    budget_unit: what the budget measures, for plot labels.
  """
  function: typing.Callable
  kind: str
  trains: bool = False
  budget: typing.Optional[str] = None
  budget_unit: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}. Received: {self.kind}")


@dataclasses.dataclass
class AttackResult:
  """Adversarial images and a per-image record.

  Attributes:
    adv_images: [B, H, W, C] float32 in [0, 1].
    flow: [B, H, W, 2] the pixel flow (dy, dx) applied to the clean images
      (`dense_image_warp` convention).
    success: [B] bool, the model's prediction on `adv_images` is wrong
      (untargeted) or equals the target (targeted).
    iterations: [B] int32, iterations (or tries) the attack used per image.
    t_norm: [B] float32, the deformation's T-norm: the largest displacement
      over pixels, sqrt(dy^2 + dx^2), in PIXELS.
    adv_logits: [B, classes] logits on `adv_images`.
  """
  adv_images: tf.Tensor
  flow: tf.Tensor
  success: tf.Tensor
  iterations: tf.Tensor
  t_norm: tf.Tensor
  adv_logits: tf.Tensor


def t_norm(flow):
  """Largest per-pixel displacement of a pixel flow [B, H, W, 2] -> [B] px."""
  return tf.reduce_max(tf.norm(tf.cast(flow, tf.float32), axis=-1),
                       axis=[1, 2])


def where_per_image(condition, x, y):
  """`tf.where(condition[:, None, ...], x, y)`: per image, all of x [B, ...]
  where condition [B] bool holds, else all of y; as a select of [B, n]
  rows. TF's CPU kernel broadcasts a [B, 1, 1, 1] condition over 4-d
  operands ~4x slower (measured, AMD EPYC: 1.43 against 0.33-0.45 ms for
  [250, 28, 28, 2] flows; stAdv selects its best flow every step). The
  same values: a select only copies."""
  inner = tf.TensorShape(x.shape[1:]).merge_with(tf.TensorShape(y.shape[1:]))
  if inner.is_fully_defined() and inner.num_elements():  # static shapes
    rows, shape = [-1, inner.num_elements()], [-1] + inner.as_list()
  else:
    shape = tf.shape(x)
    rows = tf.stack([shape[0], tf.reduce_prod(shape[1:])])
  return tf.reshape(tf.where(condition[:, None], tf.reshape(x, rows),
                             tf.reshape(y, rows)), shape)


def stateless_seed(seed):
  """An int, or a [2] int tensor/sequence, as a [2] int32 stateless seed."""
  if isinstance(seed, int):
    return tf.constant([seed, 0], tf.int32)
  seed = tf.cast(seed, tf.int32)
  if seed.shape != (2,):
    raise errors.UserError("seed must be an int or a [2] int tensor. "
                           f"Received: shape {seed.shape}")
  return seed


def logits_of(model, images):
  """Inference-mode logits in float32 (BatchNorm uses moving statistics,
  folded into the convolution before it: `folding.inference_function`).
  Inside `weights_read_once(model)`, with the weights as prepared there."""
  for entry in reversed(_prepared.stack):
    if entry.model is model:
      return tf.cast(entry.function(images), tf.float32)
  return tf.cast(folding.inference_function(model)(images), tf.float32)


# Whether compiled attacks trace in `weights_read_once` (read when an
# attack is traced); FGR_TF_READ_WEIGHTS_ONCE=0 turns it off.
READ_WEIGHTS_ONCE = environment.switch("FGR_TF_READ_WEIGHTS_ONCE")


class _PreparedModel(typing.NamedTuple):
  """A `weights_read_once` block's model, its prepared inference function
  (images -> outputs) and whether the block's batches vary in size."""
  model: typing.Any
  function: typing.Callable
  varying_batch: bool


class _Prepared(threading.local):
  def __init__(self):
    super().__init__()
    self.stack = []  # _PreparedModel, innermost last


_prepared = _Prepared()


@contextlib.contextmanager
def weights_read_once(model, varying_batch=False):
  """Within the block, `logits_of(model, ...)` applies the model's weights
  as read (and folded, and transformed: `folding.
  prepared_inference_function`) at entry, so that attack loops traced in
  the block carry them as loop-invariant tensors instead of recomputing
  them at every iteration. Every compiled attack traces in one
  (`compiled`): its weights are read once per call. `varying_batch`: the
  loops' batch size changes between iterations (active sets), so nothing
  is compiled by XLA per shape (`folding.prepared_inference_function`)."""
  _prepared.stack.append(_PreparedModel(
      model, folding.prepared_inference_function(model)(varying_batch),
      varying_batch))
  try:
    yield
  finally:
    _prepared.stack.pop()


def is_adversarial(logits, labels, target=None):
  """[B] bool: misclassified (untargeted) or classified as `target`."""
  predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
  if target is None:
    return tf.not_equal(predictions, tf.cast(labels, tf.int32))
  return tf.equal(predictions, tf.cast(target, tf.int32))


def cw_margin(logits, labels, kappa=0.0, target=None):
  """C&W margin loss per image [B], minimized by the attacker.

  Untargeted: max(Z_y - max_{i != y} Z_i, -kappa);
  targeted:   max(max_{i != t} Z_i - Z_t, -kappa).
  """
  classes = tf.shape(logits)[-1]
  cls = tf.cast(labels if target is None else target, tf.int32)
  one_hot = tf.one_hot(cls, classes, dtype=logits.dtype)
  own = tf.reduce_sum(logits * one_hot, axis=-1)
  other = tf.reduce_max(logits - 1e9 * one_hot, axis=-1)
  margin = own - other if target is None else other - own
  return tf.maximum(margin, -kappa)


def deform(images, flow, padding="edge", normalized=False):
  """The deformed image every attack returns: `dense_image_warp` by the
  pixel flow [B, H, W, 2] (dy, dx), clipped to [0, 1] (`warp.
  clip_unit_interval`: TF's clip and its gradient, in one select).

  `images` [B, H, W, C], or `warp.prepare_image(images, padding)` (its own
  padding then): attacks prepare their images once, outside their loops.
  `normalized`: `flow` is a normalized (x, y) flow instead, converted by
  `warp.normalized_to_pixel_flow`. Inside an attack compiled on a fixed
  batch (`weights_read_once`), the conversion, the warp, the clip and
  their gradients run as XLA computations (`DEFORM_BY_XLA`).
  """
  images = as_prepared(images, padding)
  fixed_batch = _prepared.stack and not _prepared.stack[-1].varying_batch
  if DEFORM_BY_XLA and fixed_batch:
    return _deform_by_xla(images, flow, normalized)
  return _deform_ops(images.neighbourhoods, flow, images.padding, normalized)


def as_prepared(images, padding="edge"):
  """`images` [B, H, W, C] prepared for warps (`warp.prepare_image`), or
  `images` itself if already a `warp.PreparedImage` (its own padding)."""
  if isinstance(images, warp.PreparedImage):
    return images
  return warp.prepare_image(images, padding)


# Whether `deform` runs as XLA computations in attacks compiled on a fixed
# batch: value, flow gradient and image gradient one fused computation
# each instead of ~40 small TF ops (the index arithmetic, the gather, the
# interpolation and the clip, forward and backward). Measured alone (a
# scratch loop of deform + flow gradient, Xeon, AVX-512): 4.9 -> 2.2 ms
# per step on [250, 28, 28, 1], 8.3 -> 2.2 on [128, 32, 32, 3]. Same
# operations; XLA may fuse a product and a sum into one rounding (the
# query point within an ulp of TF's). Not with shrinking batches (XLA
# compiles once per shape); under pfor (ADef's jacobian) the gradient is
# TF's ops, as elsewhere in the attacks' prepared path. FGR_TF_DEFORM=ops
# turns it off.
DEFORM_BY_XLA = environment.choice("FGR_TF_DEFORM", "xla",
                                   ("xla", "ops")) == "xla"


def _deform_ops(neighbourhoods, flow, padding, normalized):
  """`deform` of prepared images, as TF ops."""
  prepared = warp.PreparedImage(neighbourhoods, padding)
  if normalized:
    flow = warp.normalized_to_pixel_flow(flow, *prepared.image_size())
  return warp.clip_unit_interval(warp.warp_prepared(prepared, flow))


@tf.function(jit_compile=True)
def _deform_ops_by_xla(neighbourhoods, flow, padding, normalized):
  return _deform_ops(neighbourhoods, flow, padding, normalized)


def deform_vjp(neighbourhoods, flow, upstream, padding, normalized, wrt):
  """d/d `wrt` ("flow" or "image") of sum(upstream * deform), TF's ops."""
  source = flow if wrt == "flow" else neighbourhoods
  with tf.GradientTape() as tape:
    tape.watch(source)
    deformed = _deform_ops(neighbourhoods, flow, padding, normalized)
  return tape.gradient(deformed, source, output_gradients=upstream)


_deform_vjp_by_xla = tf.function(deform_vjp, jit_compile=True)


def _deform_by_xla(prepared, flow, normalized):
  """`deform(prepared, flow, normalized=normalized)` and its gradients by
  XLA (TF's ops under pfor; differentiable again)."""

  @tf.custom_gradient
  def call(neighbourhoods, flow):
    padding = prepared.padding

    def grad(upstream):
      vjp = deform_vjp if pooling.in_pfor() else _deform_vjp_by_xla
      return tuple(vjp(neighbourhoods, flow, upstream, padding, normalized,
                       wrt) for wrt in ("image", "flow"))

    return _deform_ops_by_xla(neighbourhoods, flow, padding, normalized), grad

  return call(prepared.neighbourhoods,
              tf.cast(flow, prepared.neighbourhoods.dtype))


def first_fooling_or_worst(model, images, labels, flow_of, count,
                           flow_shape, padding="edge"):
  """Tries `count` flows in order on the whole batch (fixed shapes, for XLA
  and for gradient-free attacks): per image, the first flow that fools the
  model, else the one with the highest cross-entropy.

  Args:
    model, images, labels: as the attacks take them; `images` may be
      prepared (`as_prepared`, its own padding then).
    flow_of: i (int32 scalar) -> [B, H, W, 2] pixel flow of try i.
    count: number of tries (int or int32 scalar).
    flow_shape: [4] int32, the flows' shape [B, H, W, 2].
    padding: "edge" or "zeros" outside the image.

  Returns:
    (flow [B, H, W, 2] kept per image, tries used [B] int32: up to and
    including the first fooling one, else all).
  """
  batch = flow_shape[0]
  prepared = as_prepared(images, padding)

  def body(i, best_loss, best_flow, done, used):
    flow = flow_of(i)
    logits = logits_of(model, deform(prepared, flow))
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    fooled = is_adversarial(logits, labels)
    active = tf.logical_not(done)
    take = tf.logical_and(active, tf.logical_or(fooled, loss > best_loss))
    best_flow = where_per_image(take, flow, best_flow)
    best_loss = tf.where(take, loss, best_loss)
    used = used + tf.cast(active, tf.int32)
    return i + 1, best_loss, best_flow, tf.logical_or(done, fooled), used

  _, _, flow, _, used = tf.while_loop(
      lambda i, *_: i < count, body,
      (tf.constant(0), tf.fill([batch], -1.0), tf.zeros(flow_shape),
       tf.zeros([batch], tf.bool), tf.zeros([batch], tf.int32)))
  return flow, used


def resolve_jit_compile(jit_compile):
  """"auto" -> XLA where there is a GPU or TPU (as `FGRModel.compile`):
  fast there; on CPUs XLA measured ~8x slower for conv nets."""
  if jit_compile == "auto":
    return bool(tf.config.list_logical_devices("GPU") or
                tf.config.list_logical_devices("TPU"))
  if not isinstance(jit_compile, bool):
    raise errors.UserError("jit_compile must be True, False or 'auto'. "
                           f"Received: jit_compile={jit_compile!r}")
  return jit_compile


# Active sets: an attack whose images finish at different times (ADef,
# worst-of-k, stAdv's search rounds) works on the images still running only,
# gathered into a smaller batch and scattered back, so that its cost follows
# the images that still need work instead of the slowest image of the batch.
# Each image's computation is the same as in the full batch (every op is
# per image), so the results are the same up to float32 round-off (the
# kernels may block a smaller batch differently). Dynamic shapes are for
# graph mode only: under XLA, and inside another tf.function (an XLA
# training step, say), the attacks keep a fixed batch and mask finished
# images instead. `False` forces the fixed batch everywhere (tests).
ACTIVE_SETS = True


def use_active_sets(jit_compile):
  """Whether an attack called now, with this `jit_compile`, may shrink its
  batch to the images still running (`ACTIVE_SETS`)."""
  return (ACTIVE_SETS and not resolve_jit_compile(jit_compile) and
          tf.executing_eagerly())


def active_indices(active):
  """[n] int32 indices of the True entries of `active` [B]."""
  return tf.cast(tf.where(active)[:, 0], tf.int32)


def scatter(full, indices, values):
  """`full` with rows `indices` [n] replaced by `values` [n, ...]."""
  return tf.tensor_scatter_nd_update(full, indices[:, None], values)


def check_inputs(images, labels, name, model=None):
  """Validates a batch (`fgr_tf.validation`) against `model`'s input
  channels and classes; returns (images float32, labels int32)."""
  channels, classes = validation.model_shape(model)
  images = validation.check_images(images, name, channels)
  labels = validation.check_labels(labels, name, classes,
                                   batch=images.shape[0])
  return tf.cast(images, tf.float32), tf.cast(labels, tf.int32)


# The compiled attacks of a model live in this attribute of the model
# itself: each tf.function closes over its model, so a cache outside the
# model (even a WeakKeyDictionary keyed by it) would keep every attacked
# model, and its graphs, alive. Inside the model the reference is a cycle
# that the garbage collector frees with the model.
_CACHE_ATTRIBUTE = "_fgr_tf_compiled_attacks"
_warned_uncached = set()


def compiled(model, key, build, jit_compile="auto", varying_batch=False):
  """One tf.function per (model, key), so repeated batches do not retrace.

  The functions are cached on `model` (attribute `_fgr_tf_compiled_attacks`,
  untracked by Keras), so they are freed with it. A model that takes no
  attributes gets a new tf.function at every call (correct, but it
  retraces; a warning says so once per type).

  Args:
    model: the attacked model.
    key: hashable description of the attack's static settings.
    build: callable returning the Python function to compile.
    jit_compile: True, False or "auto" (`resolve_jit_compile`).
    varying_batch: the attack's loops run on batches that shrink between
      iterations (active sets; `weights_read_once`).
  """
  jit = resolve_jit_compile(jit_compile)
  key = (key, jit, varying_batch)
  unprepared_build = build

  def build():
    function = unprepared_build()

    # wraps: tf.function keys its retracing statistics on the wrapped
    # function's code, one per attack, as before this wrapper.
    @functools.wraps(function)
    def attack(*args, **kwargs):
      if not READ_WEIGHTS_ONCE:
        return function(*args, **kwargs)
      with weights_read_once(model, varying_batch):
        return function(*args, **kwargs)

    return attack
  per_model = getattr(model, _CACHE_ATTRIBUTE, None)
  if per_model is None:
    per_model = {}
    try:
      # object.__setattr__: not a Keras-tracked attribute (not saved).
      object.__setattr__(model, _CACHE_ATTRIBUTE, per_model)
    except (AttributeError, TypeError):
      if type(model) not in _warned_uncached:
        _warned_uncached.add(type(model))
        logging.warning(
            "Cannot cache compiled attacks on a %s (it takes no attributes): "
            "every call retraces. Wrap it in a keras.Model or a function.",
            type(model).__name__)
      return tf.function(build(), reduce_retracing=True, jit_compile=jit)
  if key not in per_model:
    per_model[key] = tf.function(build(), reduce_retracing=True,
                                 jit_compile=jit)
  return per_model[key]
