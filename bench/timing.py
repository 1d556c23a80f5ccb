"""Timing helpers shared by the micro-benchmarks."""

import statistics
import time

import tensorflow as tf


def median_ms(step, repeats):
  """Median wall time of `step()` in ms over `repeats` calls, after one
  untimed call; every output tensor is fetched (`.numpy()`) in the time."""
  step()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    [t.numpy() for t in tf.nest.flatten(step())]
    seconds.append(time.perf_counter() - start)
  return 1000 * statistics.median(seconds)
