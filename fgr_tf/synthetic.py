"""A synthetic, Fashion-MNIST-shaped data set the project makes itself.

Ten classes of thin strokes (bars, crosses, outlines, diagonals, ...) drawn
at random positions and lengths on a dark background, plus noise. A small
CNN learns it in seconds, and small deformations change it the way they
change real digits and garments, so tests and smoke runs need no download.
"""

import numpy as np

from fgr_tf import errors

NUM_CLASSES = 10


def _draw(kind, size, rng):
  image = np.zeros((size, size), np.float32)
  lo, hi = size // 5, size - size // 5
  c = rng.integers(lo + 2, hi - 2, size=2)
  r = rng.integers(size // 6, size // 3)
  t = 2  # stroke width in pixels
  y0, y1 = max(c[0] - r, 0), min(c[0] + r, size)
  x0, x1 = max(c[1] - r, 0), min(c[1] + r, size)
  if kind == 0:  # horizontal bar
    image[c[0]:c[0] + t, x0:x1] = 1
  elif kind == 1:  # vertical bar
    image[y0:y1, c[1]:c[1] + t] = 1
  elif kind == 2:  # plus
    image[c[0]:c[0] + t, x0:x1] = 1
    image[y0:y1, c[1]:c[1] + t] = 1
  elif kind == 3:  # square outline
    image[y0:y1, x0:x0 + t] = image[y0:y1, x1 - t:x1] = 1
    image[y0:y0 + t, x0:x1] = image[y1 - t:y1, x0:x1] = 1
  elif kind in (4, 5):  # diagonals
    for i in range(-r, r):
      y, x = c[0] + i, c[1] + (i if kind == 4 else -i)
      if 0 <= y < size and 0 <= x < size:
        image[y, max(x - 1, 0):x + 1] = 1
  elif kind == 6:  # L
    image[y0:y1, x0:x0 + t] = 1
    image[y1 - t:y1, x0:x1] = 1
  elif kind == 7:  # T
    image[y0:y0 + t, x0:x1] = 1
    image[y0:y1, c[1]:c[1] + t] = 1
  elif kind == 8:  # two horizontal bars
    image[y0:y0 + t, x0:x1] = image[y1 - t:y1, x0:x1] = 1
  else:  # two vertical bars
    image[y0:y1, x0:x0 + t] = image[y0:y1, x1 - t:x1] = 1
  return image


def shapes(num_examples, size=28, seed=0, noise=0.05):
  """Makes (images [N, size, size, 1] float32 in [0, 1], labels [N] int32).

  Args:
    num_examples: N.
    size: height and width in pixels (>= 12).
    seed: numpy seed; the same seed gives the same data.
    noise: std of the additive Gaussian noise (values are clipped).
  """
  if size < 12:
    raise errors.UserError(f"size must be >= 12. Received: size={size}")
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples).astype(np.int32)
  images = np.stack([_draw(k, size, rng) for k in labels])
  images = images + noise * rng.standard_normal(images.shape)
  return np.clip(images, 0, 1).astype(np.float32)[..., None], labels
