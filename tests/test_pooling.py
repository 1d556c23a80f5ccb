"""Max pooling whose first and second derivatives pick the same element."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fgr_tf.backbones import pooling


def _derivatives(pool, x, dy, w, jit, in_loop=False):
  """(pool(x), d<pool(x), dy>/dx, d<that, w>/d dy) in one function; with
  `in_loop` inside a `tf.while_loop` body (as the attacks run it)."""

  def derivatives(x, dy):
    with tf.GradientTape() as outer:
      outer.watch(dy)
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = pool(x)
      dx = inner.gradient(y, x, dy)
      second = tf.reduce_sum(dx * w)
    return y, dx, outer.gradient(second, dy)

  @tf.function(jit_compile=jit)
  def run(x, dy):
    if not in_loop:
      return derivatives(x, dy)
    zeros = tf.zeros_like(dy)
    return tf.while_loop(
        lambda i, *_: i < 1,
        lambda i, *_: (i + 1,) + derivatives(x, dy),
        (0, zeros, tf.zeros_like(x), zeros))[1:]

  return run(x, dy)


def _inputs(shape, near_ties):
  rng = np.random.default_rng(0)
  if near_ties:  # equal after rounding to bfloat16, distinct in float32
    x = rng.uniform(0.5, 0.5001, size=shape)
  else:  # after a ReLU: exact ties at 0, plus one tie of positives
    x = np.maximum(rng.normal(size=shape), 0)
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = 5.0
  out = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  return (tf.constant(x, tf.float32),
          tf.constant(rng.normal(size=out), tf.float32),
          tf.constant(rng.normal(size=shape), tf.float32))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("native_first,in_loop", [(True, False), (True, True),
                                                  (False, False)])
@pytest.mark.parametrize("shape,near_ties", [((3, 8, 8, 2), True),
                                             ((3, 7, 9, 2), False)])
@pytest.mark.parametrize("second_form", ["xla", "ops"])
def test_both_derivatives_route_to_the_first_maximum(jit, native_first,
                                                     in_loop, shape,
                                                     near_ties, second_form,
                                                     monkeypatch):
  """Graph and XLA; TF's MaxPoolGrad (CPU), the mask form (GPUs) and, in a
  while loop, the mask form compiled by XLA (CPU); the second derivative
  as one XLA computation or as TF ops."""
  monkeypatch.setattr(pooling, "_native_first_derivative",
                      lambda: native_first)
  monkeypatch.setattr(pooling, "SECOND_DERIVATIVE", second_form)
  x, dy, w = _inputs(shape, near_ties)
  y, dx, second = _derivatives(pooling.max_pool, x, dy, w, jit, in_loop)
  np.testing.assert_array_equal(y, tf.nn.max_pool2d(x, 2, 2, "VALID"))
  # The first maximum of each window, in row-major order, by NumPy:
  xs = x.numpy()
  rows, cols = shape[1] // 2 * 2, shape[2] // 2 * 2
  windows = xs[:, :rows, :cols].reshape(shape[0], rows // 2, 2, cols // 2, 2,
                                        shape[3]).transpose(0, 1, 3, 5, 2, 4)
  first = windows.reshape(windows.shape[:4] + (4,)).argmax(-1)
  mask = np.zeros(windows.shape[:4] + (4,))
  np.put_along_axis(mask, first[..., None], 1.0, axis=-1)
  mask = mask.reshape(windows.shape).transpose(0, 1, 4, 2, 5, 3).reshape(
      shape[0], rows, cols, shape[3])
  expected_dx = np.zeros(shape)
  expected_dx[:, :rows, :cols] = mask * np.repeat(np.repeat(dy, 2, 1), 2, 2)
  np.testing.assert_array_equal(dx, expected_dx.astype(np.float32))
  # The second derivative sums w over the same elements.
  expected = (mask * w.numpy()[:, :rows, :cols]).reshape(
      shape[0], rows // 2, 2, cols // 2, 2, shape[3]).sum(axis=(2, 4))
  np.testing.assert_allclose(second, expected, rtol=1e-6, atol=1e-6)
  assert xs[0, 0, 0, 0] != 5.0 or dx[0, 0, 0, 0] != 0 and dx[0, 0, 1, 0] == 0


@pytest.mark.parametrize("setting", ["xla", "ops"])
def test_second_derivative_is_one_xla_computation(setting, monkeypatch):
  """By default the second derivative is the XLA-compiled mask form: no
  full-size comparisons in the graph (FGR_TF_POOL_SECOND_DERIVATIVE=ops:
  the mask as TF ops)."""
  monkeypatch.setattr(pooling, "SECOND_DERIVATIVE", setting)
  x, dy, w = _inputs((2, 4, 4, 1), False)

  def second(x, dy):
    with tf.GradientTape() as outer:
      outer.watch(dy)
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = pooling.max_pool(x)
      second = tf.reduce_sum(inner.gradient(y, x, dy) * w)
    return outer.gradient(second, dy)

  graph = tf.function(second).get_concrete_function(x, dy).graph
  nodes = graph.as_graph_def().node
  xla_calls = [n for n in nodes if "_XlaMustCompile" in n.attr and
               n.attr["_XlaMustCompile"].b]
  assert bool(xla_calls) == (setting == "xla")
  assert ("Equal" in {n.op for n in nodes}) == (setting == "ops")


def test_layer_keeps_keras_config_and_round_trips(tmp_path):
  inputs = keras.Input((6, 6, 2))
  model = keras.Model(inputs, pooling.MaxPooling2D(2, 2)(inputs))
  path = tmp_path / "pool.keras"
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded.layers[-1], pooling.MaxPooling2D)
  x = np.random.default_rng(1).normal(size=(2, 6, 6, 2)).astype(np.float32)
  np.testing.assert_array_equal(loaded(x), tf.nn.max_pool2d(x, 2, 2, "VALID"))
  # Overlapping pools are Keras's own.
  overlapping = pooling.MaxPooling2D(3, 2)
  assert not pooling.applies((2, 6, 6, 2), overlapping.pool_size,
                             overlapping.strides, overlapping.padding,
                             overlapping.data_format)


@pytest.mark.parametrize("setting,op", [("xla", "XlaMustCompile"),
                                        ("native", "MaxPoolGrad")])
def test_first_derivative_in_while_loops(setting, op, monkeypatch):
  """In a loop body on CPU the first derivative is the XLA-compiled mask
  form (oneDNN's rewrite of MaxPoolGrad is order-dependent there), unless
  FGR_TF_POOL_LOOP_GRADIENT says "native"; outside loops TF's MaxPoolGrad."""
  monkeypatch.setattr(pooling, "LOOP_GRADIENT", setting)
  monkeypatch.setattr(pooling, "_native_first_derivative", lambda: True)
  x, dy, _ = _inputs((2, 4, 4, 1), False)

  def body(i, total, x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = pooling.max_pool(x)
    return i + 1, total + tape.gradient(y, x, dy), x

  def loop(x):
    return tf.while_loop(lambda i, *_: i < 2, body,
                         (0, tf.zeros_like(x), x))[1]

  graph = tf.function(loop).get_concrete_function(x).graph.as_graph_def()
  bodies = [f for f in graph.library.function
            if any(n.op == "MaxPool" for n in f.node_def)]
  assert len(bodies) == 1
  ops = {n.op for n in bodies[0].node_def}
  xla_calls = [n for n in bodies[0].node_def
               if "_XlaMustCompile" in n.attr and
               n.attr["_XlaMustCompile"].b]
  assert ("MaxPoolGrad" in ops) == (op == "MaxPoolGrad")
  assert bool(xla_calls) == (op == "XlaMustCompile")
  outside = tf.function(lambda x: body(0, x, x)[1]).get_concrete_function(x)
  assert "MaxPoolGrad" in {n.op for n in outside.graph.as_graph_def().node}
  # Same numbers either way.
  np.testing.assert_array_equal(tf.function(loop)(x),
                                2 * tf.raw_ops.MaxPoolGrad(
                                    orig_input=x, orig_output=tf.nn.max_pool2d(
                                        x, 2, 2, "VALID"), grad=dy,
                                    ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1],
                                    padding="VALID"))


@pytest.mark.parametrize("pfor_mask", [True, False])
def test_jacobians_under_pfor_route_to_the_first_maximum(pfor_mask,
                                                         monkeypatch):
  """ADef's input-gradient jacobian (`tape.jacobian`, vectorized by pfor):
  the first derivative as the mask form (`PFOR_MASK`, no MaxPoolGrad in
  the graph) or TF's MaxPoolGrad; both equal the unvectorized jacobian,
  ties included."""
  monkeypatch.setattr(pooling, "PFOR_MASK", pfor_mask)
  monkeypatch.setattr(pooling, "_native_first_derivative", lambda: True)
  x, _, _ = _inputs((2, 5, 4, 3), False)

  def jacobian(x, use_pfor):
    with tf.GradientTape(persistent=not use_pfor) as tape:
      tape.watch(x)
      y = pooling.max_pool(x)
    return tape.jacobian(y, x, experimental_use_pfor=use_pfor)

  vectorized = tf.function(lambda x: jacobian(x, True))
  np.testing.assert_array_equal(vectorized(x), jacobian(x, False))
  ops = {n.op for f in vectorized.get_concrete_function(
      x).graph.as_graph_def().library.function for n in f.node_def} | {
          n.op for n in vectorized.get_concrete_function(
              x).graph.as_graph_def().node}
  assert ("MaxPoolGrad" in ops) == (not pfor_mask)
