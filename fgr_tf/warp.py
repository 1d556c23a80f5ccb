"""Differentiable image warping and flow-unit conversions.

Conventions (SPEC §2):
  * images are NHWC floats in [0, 1];
  * a *pixel* flow has shape [B, H, W, 2], channel 0 = dy, channel 1 = dx, in
    pixels, and samples `out[b, y, x] = bilinear(image[b], y - dy, x - dx)`
    (the convention of tensorflow_addons' `dense_image_warp`);
  * a *normalized* flow is the original PyTorch code's unit (`affine_grid`
    with `align_corners=True`): channel 0 = x, channel 1 = y, and a
    displacement of 1.0 of the sampling point equals (W-1)/2 pixels
    horizontally and (H-1)/2 pixels vertically.
"""

import typing

import tensorflow as tf


def _check_image(image):
  if image.shape.rank != 4:
    raise ValueError(
        "dense_image_warp expects images of shape [batch, height, width, "
        f"channels]. Received: image.shape={image.shape}")
  for axis, name in ((1, "height"), (2, "width")):
    size = image.shape[axis]
    if size is not None and size < 2:
      raise ValueError(f"dense_image_warp needs {name} >= 2. "
                       f"Received: image.shape={image.shape}")


def _check_flow(flow, height, width):
  """`height`, `width`: the image's, static ints or tensors (unchecked)."""
  if flow.shape.rank != 4 or flow.shape[-1] not in (2, None):
    raise ValueError(
        "dense_image_warp expects a flow of shape [batch, height, width, 2]. "
        f"Received: flow.shape={flow.shape}")
  for size, flow_size in ((height, flow.shape[1]), (width, flow.shape[2])):
    if isinstance(size, int) and flow_size is not None and size != flow_size:
      raise ValueError(
          "image and flow must have the same height and width. Received: "
          f"image height, width {height}, {width}, flow.shape={flow.shape}")


@tf.custom_gradient
def clip_unit_interval(values):
  """`tf.clip_by_value(values, 0, 1)`, whose gradient passes on the CLOSED
  interval [0, 1] (as TF's clip: ties go to the clipped value).

  The warp clips its interpolation weights with it: tfa writes
  `max(0, alpha)`, and TF sends the gradient of `maximum` at a tie to its
  first (constant) argument, so at integer query points (e.g. every point
  of a zero flow) tfa's gradient w.r.t. the flow vanishes. Letting the
  gradient through at alpha == 0 gives the one-sided forward difference
  there (and the backward difference at alpha == 1, the last row/column).
  The attacks clip their deformed images with it too.

  The gradient is written out (one select, linear in the upstream gradient,
  so differentiable again) instead of TF's gradients of a clip (a
  comparison and a select per bound and call; the warp's selects and zero
  tensors, forward and backward, were ~7% of stAdv's op time on the
  quickstart CNN).
  """
  inside = tf.logical_and(values >= 0.0, values <= 1.0)

  def grad(upstream):
    return tf.where(inside, upstream, tf.zeros([], upstream.dtype))

  return tf.clip_by_value(values, 0.0, 1.0), grad


PADDINGS = ("edge", "zeros")


def dense_image_warp(image, flow, padding="edge", name=None):
  """Warps `image` by a dense per-pixel `flow` (bilinear sampling).

  Forward values equal tensorflow_addons' `tfa.image.dense_image_warp`:
  `out[b, y, x, :] = bilinear(image[b], y - flow[b, y, x, 0],
  x - flow[b, y, x, 1])`, with the floor of each query coordinate clamped to
  [0, size - 2] (points outside the image take the border value). Unlike
  tfa, the gradient w.r.t. the flow at integer query points is the one-sided
  forward difference (tfa's is zero; SPEC §2). Twice differentiable; works
  in eager mode, in `tf.function` and under XLA.

  With `padding="zeros"` the image is instead extended by zeros, as torch's
  `grid_sample(..., padding_mode="zeros")` (the original's flow attack):
  of the four pixels around a query point, those outside the image count as
  0 in the bilinear sum, so a point half a pixel outside reads half the
  border value and a point one pixel or more outside reads 0. Its gradient
  at integer query points is the same forward difference (against 0 past
  the last row/column, as grid_sample's).

  Args:
    image: float tensor [B, H, W, C] (float16/bfloat16/float32/float64),
      H, W >= 2.
    flow: tensor [B, H, W, 2] in PIXELS, channel 0 = dy, channel 1 = dx.
      Cast to the image's dtype.
    padding: "edge" (tfa's clamp to the border, the default) or "zeros"
      (grid_sample's default).
    name: optional name scope.

  Returns:
    The warped image, [B, H, W, C], same dtype as `image`.
  """
  with tf.name_scope(name or "dense_image_warp"):
    return warp_prepared(prepare_image(image, padding), flow)


class PreparedImage(typing.NamedTuple):
  """An image batch prepared for warps (`prepare_image`): each position's
  2x2 neighbourhood, for `warp_prepared`.

  Attributes:
    neighbourhoods: [B, H', W', 4 C]: at (y, x) the pixels (y, x), (y, x+1),
      (y+1, x), (y+1, x+1) side by side, of the image (H' = H - 1, "edge")
      or of the image extended by 2 zero rows and columns on each side
      (H' = H + 3, "zeros").
    padding: "edge" or "zeros".
  """
  neighbourhoods: tf.Tensor
  padding: str

  def image_size(self):
    """(H, W) of the image: static ints where known, else int32 scalars."""
    offset = -1 if self.padding == "edge" else 3
    static = self.neighbourhoods.shape[1:3]
    dynamic = tf.shape(self.neighbourhoods)
    return tuple(dynamic[axis] - offset if size is None else size - offset
                 for axis, size in ((1, static[0]), (2, static[1])))


def prepare_image(image, padding="edge"):
  """`image` [B, H, W, C] prepared for repeated warps by `warp_prepared`
  (`dense_image_warp(image, flow, padding)` = `warp_prepared(
  prepare_image(image, padding), flow)`): the attacks prepare their
  images once, outside their loops. Differentiable w.r.t. `image`."""
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}. "
                     f"Received: padding={padding!r}")
  image = tf.convert_to_tensor(image)
  if not image.dtype.is_floating:
    raise TypeError("dense_image_warp expects a floating-point image. "
                    f"Received: image.dtype={image.dtype.name}")
  _check_image(image)
  if padding == "zeros":
    image = tf.pad(image, [[0, 0], [2, 2], [2, 2], [0, 0]])
  return PreparedImage(tf.concat(
      [image[:, :-1, :-1], image[:, :-1, 1:], image[:, 1:, :-1],
       image[:, 1:, 1:]], axis=-1), padding)


def warp_prepared(prepared, flow):
  """`dense_image_warp` of a `prepare_image`d image by `flow` [B, H, W, 2]
  (pixels, (dy, dx)); [B, H, W, C] in the image's dtype.

  One gather of each query point's 2x2 neighbourhood: TF's gather costs
  per index (~4 ns; four gathers of one corner each took 0.8 ms apiece on
  a [250, 28, 28, 1] batch, 8% of flow-PGD's op time on the quickstart
  CNN)."""
  neighbourhoods = prepared.neighbourhoods
  flow = tf.cast(tf.convert_to_tensor(flow), neighbourhoods.dtype)
  height, width = prepared.image_size()
  _check_flow(flow, height, width)
  grid_y, grid_x = tf.meshgrid(
      tf.range(height), tf.range(width), indexing="ij")
  # Unstacked, not sliced: the gradient of slicing the channel axis is a
  # StridedSliceGrad per channel, TF's slow strided copy (half of this
  # step's cost in a flow gradient on [250, 28, 28, 2], against one Pack).
  flow_y, flow_x = tf.unstack(flow, num=2, axis=-1)
  query_y = tf.cast(grid_y, flow.dtype)[None] - flow_y  # [B, H, W]
  query_x = tf.cast(grid_x, flow.dtype)[None] - flow_x
  if prepared.padding == "edge":
    # tfa's sampling: floor clamped to [0, size - 2], alpha to [0, 1].
    floor_y, alpha_y = _edge_floor_and_alpha(query_y, height)
    floor_x, alpha_x = _edge_floor_and_alpha(query_x, width)
  else:
    floor_y, alpha_y = _zeros_floor_and_alpha(query_y, height)
    floor_x, alpha_x = _zeros_floor_and_alpha(query_x, width)
  # The static channel count where known: the output keeps it (Keras runs
  # a convolution whose input has unknown channels through XLA).
  channels4 = neighbourhoods.shape[3]
  if channels4 is None:
    channels4 = tf.shape(neighbourhoods)[3]
  shape = tf.shape(neighbourhoods)
  flat = tf.reshape(neighbourhoods, [-1, channels4])
  base = (tf.range(shape[0]) * shape[1] * shape[2])[:, None, None]
  corners = tf.gather(flat, base + floor_y * shape[2] + floor_x)
  return _interpolate(corners, alpha_y, alpha_x)


def _finite_floor(query, low, high):
  """floor(query) clamped to [low, high]; 0 where not finite; no gradient.

  (A NaN/Inf flow must give NaN pixels, not out-of-range gathers.)"""
  low = tf.cast(low, query.dtype)
  high = tf.cast(high, query.dtype)
  floor = tf.minimum(tf.maximum(low, tf.floor(query)), high)
  return tf.stop_gradient(
      tf.where(tf.math.is_finite(floor), floor, tf.zeros_like(floor)))


def _sum_channels(t):
  if t.shape[-1] == 1:
    return t
  return tf.reduce_sum(t, axis=-1, keepdims=True)


@tf.custom_gradient
def _interpolate(corners, alpha_y, alpha_x):
  """Bilinear interpolation [B, H, W, C] of the gathered neighbourhoods
  `corners` [B, H, W, 4 C] (`PreparedImage`) with weights alpha_y, alpha_x
  [B, H, W, 1] (towards the bottom / right).

  Same operation order as tfa, so forward values agree bit for bit. The
  gradient is written out (the weights' products summed over channels,
  the corners' four as one tensor, matching the gather's rows), from the
  inputs only, so that it is differentiable again.
  """
  top_left, top_right, bottom_left, bottom_right = tf.split(corners, 4, -1)
  interp_top = alpha_x * (top_right - top_left) + top_left
  interp_bottom = alpha_x * (bottom_right - bottom_left) + bottom_left
  out = alpha_y * (interp_bottom - interp_top) + interp_top

  def grad(upstream):
    # Recomputed from the inputs: the tape records the gradient's ops (for
    # second derivatives), not the forward's.
    top_left, top_right, bottom_left, bottom_right = tf.split(corners, 4, -1)
    right_top = top_right - top_left
    right_bottom = bottom_right - bottom_left
    interp_top = alpha_x * right_top + top_left
    interp_bottom = alpha_x * right_bottom + bottom_left
    to_bottom = upstream * alpha_y
    to_top = upstream - to_bottom
    d_alpha_y = _sum_channels(upstream * (interp_bottom - interp_top))
    d_alpha_x = _sum_channels(to_top * right_top + to_bottom * right_bottom)
    to_top_right = to_top * alpha_x
    to_bottom_right = to_bottom * alpha_x
    d_corners = tf.concat(
        [to_top - to_top_right, to_top_right,
         to_bottom - to_bottom_right, to_bottom_right], axis=-1)
    return d_corners, d_alpha_y, d_alpha_x

  return out, grad


def _edge_floor_and_alpha(query, size):
  """tfa's: floor clamped to [0, size - 2] (int32), alpha clipped to [0, 1]
  ([..., 1])."""
  floor = _finite_floor(query, 0, size - 2)
  alpha = clip_unit_interval(query - floor)
  return tf.cast(floor, tf.int32), tf.expand_dims(alpha, -1)


def _zeros_floor_and_alpha(query, size):
  """grid_sample's zeros padding: out-of-image corners weigh nothing. The
  floor is clamped to [-2, size] (beyond that all four corners are outside
  anyway, value and gradient 0) and shifted by the extension's 2 rows or
  columns of zeros, from which every corner is read; alpha unclipped."""
  floor = _finite_floor(query, -2, size)
  alpha = tf.expand_dims(query - floor, -1)
  return tf.cast(floor, tf.int32) + 2, alpha


def zero_flow_jacobian(images):
  """d dense_image_warp(images, flow) / d flow at flow = 0, in pixels.

  At a zero flow every query point is an integer pixel, so the warp is the
  identity and its derivative is a finite difference of the image: the
  forward difference `image[y+1] - image[y]` on rows 0..H-2 and the backward
  difference on the last row (likewise for columns), negated because the
  warp samples at `y - dy`. This is what `dense_image_warp`'s gradient gives
  at a zero flow, without any gather.

  Args:
    images: [B, H, W, C] floats.

  Returns:
    (d_out/d_dy, d_out/d_dx), each [B, H, W, C]: the derivative of each
    output pixel and channel w.r.t. that pixel's dy and dx (pixels^-1).
  """
  def difference(axis):
    n = tf.shape(images)[axis]
    forward = tf.gather(images, tf.range(1, n), axis=axis) - tf.gather(
        images, tf.range(0, n - 1), axis=axis)
    last = tf.gather(forward, [n - 2], axis=axis)
    return tf.concat([forward, last], axis=axis)

  return -difference(1), -difference(2)


def normalized_to_pixel_flow(flow_xy, height, width):
  """Converts a normalized (x, y) flow to a pixel (dy, dx) flow.

  The normalized flow moves the sampling point by `+f`, i.e. by
  `f_x * (W-1)/2` pixels; the pixel flow samples at `y - dy`, hence the sign.

  Args:
    flow_xy: [..., 2] normalized flow, channel 0 = x, channel 1 = y.
    height, width: image size in pixels.

  Returns:
    [..., 2] pixel flow, channel 0 = dy, channel 1 = dx.
  """
  # A channel reversal times a constant: its gradient is one elementwise op
  # (slicing the channels costs a StridedSliceGrad per channel and step;
  # measured 11% of flow-PGD's op time on the quickstart's small CNN).
  flow_xy = tf.convert_to_tensor(flow_xy)
  half_h = tf.cast((height - 1) / 2, flow_xy.dtype)
  half_w = tf.cast((width - 1) / 2, flow_xy.dtype)
  return tf.reverse(flow_xy, axis=[-1]) * tf.stack([-half_h, -half_w])


def pixel_to_normalized_flow(flow_dydx, height, width):
  """Inverse of `normalized_to_pixel_flow`: pixel (dy, dx) -> normalized (x, y)."""
  flow_dydx = tf.convert_to_tensor(flow_dydx)
  half_h = tf.cast((height - 1) / 2, flow_dydx.dtype)
  half_w = tf.cast((width - 1) / 2, flow_dydx.dtype)
  return tf.reverse(flow_dydx, axis=[-1]) / tf.stack([-half_w, -half_h])


def pixel_flow_gradient_to_normalized(grad_dydx, height, width):
  """Converts d loss / d pixel flow (dy, dx) into d loss / d normalized (x, y).

  Gradients transform with the inverse of the flow's scaling:
  `dL/df_x = -(W-1)/2 * dL/d(dx)` and `dL/df_y = -(H-1)/2 * dL/d(dy)`.
  """
  grad_dydx = tf.convert_to_tensor(grad_dydx)
  half_h = tf.cast((height - 1) / 2, grad_dydx.dtype)
  half_w = tf.cast((width - 1) / 2, grad_dydx.dtype)
  return tf.reverse(grad_dydx, axis=[-1]) * tf.stack([-half_w, -half_h])


def random_deform(images, sigma, seed):
  """The original's random start: warp by N(0, sigma^2) noise, clip to [0, 1].

  Args:
    images: [B, H, W, C] floats in [0, 1].
    sigma: standard deviation of the flow in NORMALIZED units (0.01 is
      0.155 pixels at 32x32). 0 returns `images` unchanged.
    seed: stateless seed, an int32 tensor of shape [2].

  Returns:
    Deformed images, same shape and dtype, with no gradient (detached).
  """
  if isinstance(sigma, (int, float)) and sigma == 0:
    return images
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  noise_xy = tf.random.stateless_normal(
      tf.stack([shape[0], shape[1], shape[2], 2]), seed=seed,
      stddev=sigma, dtype=images.dtype)
  flow = normalized_to_pixel_flow(noise_xy, shape[1], shape[2])
  deformed = tf.clip_by_value(dense_image_warp(images, flow), 0.0, 1.0)
  return tf.stop_gradient(deformed)
