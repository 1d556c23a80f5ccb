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

import tensorflow as tf


def _check_image_and_flow(image, flow):
  if image.shape.rank != 4:
    raise ValueError(
        "dense_image_warp expects images of shape [batch, height, width, "
        f"channels]. Received: image.shape={image.shape}")
  if flow.shape.rank != 4 or flow.shape[-1] not in (2, None):
    raise ValueError(
        "dense_image_warp expects a flow of shape [batch, height, width, 2]. "
        f"Received: flow.shape={flow.shape}")
  for axis, name in ((1, "height"), (2, "width")):
    size = image.shape[axis]
    if size is not None and size < 2:
      raise ValueError(f"dense_image_warp needs {name} >= 2. "
                       f"Received: image.shape={image.shape}")
    if None not in (size, flow.shape[axis]) and size != flow.shape[axis]:
      raise ValueError("image and flow must have the same height and width. "
                       f"Received: image.shape={image.shape}, "
                       f"flow.shape={flow.shape}")


@tf.custom_gradient
def _clip_unit_interval(alpha):
  """Clips to [0, 1]; the gradient passes on the CLOSED interval.

  tfa writes `max(0, alpha)`, and TF sends the gradient of `maximum` at a tie
  to its first (constant) argument, so at integer query points (e.g. every
  point of a zero flow) tfa's gradient w.r.t. the flow vanishes. Letting the
  gradient through at alpha == 0 gives the one-sided forward difference
  there (and the backward difference at alpha == 1, the last row/column).

  The gradient is written out (one select, linear in the upstream gradient,
  so differentiable again) instead of TF's gradients of a select of a clip
  (four selects and two zero tensors per call; the warp's selects and zero
  tensors, forward and backward, were ~7% of stAdv's op time on the
  quickstart CNN).
  """
  inside = tf.logical_and(alpha >= 0.0, alpha <= 1.0)

  def grad(upstream):
    return tf.where(inside, upstream, tf.zeros([], upstream.dtype))

  return tf.clip_by_value(alpha, 0.0, 1.0), grad


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
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}. "
                     f"Received: padding={padding!r}")
  with tf.name_scope(name or "dense_image_warp"):
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
      raise TypeError("dense_image_warp expects a floating-point image. "
                      f"Received: image.dtype={image.dtype.name}")
    flow = tf.cast(tf.convert_to_tensor(flow), image.dtype)
    _check_image_and_flow(image, flow)
    shape = tf.shape(image)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]

    grid_y, grid_x = tf.meshgrid(
        tf.range(height), tf.range(width), indexing="ij")
    # Unstacked, not sliced: the gradient of slicing the channel axis is a
    # StridedSliceGrad per channel, TF's slow strided copy (half of this
    # step's cost in a flow gradient on [250, 28, 28, 2], against one Pack).
    flow_y, flow_x = tf.unstack(flow, num=2, axis=-1)
    query_y = tf.cast(grid_y, image.dtype)[None] - flow_y  # [B, H, W]
    query_x = tf.cast(grid_x, image.dtype)[None] - flow_x

    flat = tf.reshape(image, [batch * height * width, channels])
    base = (tf.range(batch) * height * width)[:, None, None]

    def gather(y, x):
      return tf.gather(flat, base + y * width + x)

    if padding == "edge":
      return _bilinear_edge(gather, query_y, query_x, height, width)
    return _bilinear_zeros(gather, query_y, query_x, height, width)


def _finite_floor(query, low, high):
  """floor(query) clamped to [low, high]; 0 where not finite; no gradient.

  (A NaN/Inf flow must give NaN pixels, not out-of-range gathers.)"""
  low = tf.cast(low, query.dtype)
  high = tf.cast(high, query.dtype)
  floor = tf.minimum(tf.maximum(low, tf.floor(query)), high)
  return tf.stop_gradient(
      tf.where(tf.math.is_finite(floor), floor, tf.zeros_like(floor)))


def _bilinear_edge(gather, query_y, query_x, height, width):
  """tfa's sampling: floor clamped to [0, size - 2], alpha to [0, 1]."""
  def floor_and_alpha(query, size):
    floor = _finite_floor(query, 0, size - 2)
    alpha = _clip_unit_interval(query - floor)
    return tf.cast(floor, tf.int32), tf.expand_dims(alpha, -1)

  floor_y, alpha_y = floor_and_alpha(query_y, height)
  floor_x, alpha_x = floor_and_alpha(query_x, width)
  top_left = gather(floor_y, floor_x)
  top_right = gather(floor_y, floor_x + 1)
  bottom_left = gather(floor_y + 1, floor_x)
  bottom_right = gather(floor_y + 1, floor_x + 1)
  # Same operation order as tfa, so forward values agree bit for bit.
  interp_top = alpha_x * (top_right - top_left) + top_left
  interp_bottom = alpha_x * (bottom_right - bottom_left) + bottom_left
  return alpha_y * (interp_bottom - interp_top) + interp_top


def _bilinear_zeros(gather, query_y, query_x, height, width):
  """grid_sample's zeros padding: out-of-image corners weigh nothing.

  The floor is clamped to [-2, size] only to keep indices small: beyond
  that all four corners are outside anyway (value and gradient 0).
  """
  def floor_and_alpha(query, size):
    floor = _finite_floor(query, -2, size)
    alpha = tf.expand_dims(query - floor, -1)
    floor = tf.cast(floor, tf.int32)
    # Corners `floor` and `floor + 1`: in-image masks, clamped indices.
    masks, indices = [], []
    for index in (floor, floor + 1):
      masks.append(tf.logical_and(index >= 0, index < size)[..., None])
      indices.append(tf.clip_by_value(index, 0, size - 1))
    return indices, masks, alpha

  (y0, y1), (my0, my1), alpha_y = floor_and_alpha(query_y, height)
  (x0, x1), (mx0, mx1), alpha_x = floor_and_alpha(query_x, width)

  def corner(y, x, mask_y, mask_x):
    value = gather(y, x)
    return tf.where(tf.logical_and(mask_y, mask_x), value,
                    tf.zeros_like(value))

  top_left = corner(y0, x0, my0, mx0)
  top_right = corner(y0, x1, my0, mx1)
  bottom_left = corner(y1, x0, my1, mx0)
  bottom_right = corner(y1, x1, my1, mx1)
  interp_top = alpha_x * (top_right - top_left) + top_left
  interp_bottom = alpha_x * (bottom_right - bottom_left) + bottom_left
  return alpha_y * (interp_bottom - interp_top) + interp_top


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
