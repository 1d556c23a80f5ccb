"""Serving robustness: a soak of valid and invalid requests (bench)."""

import keras

import fgr_tf
from bench import serving_soak
from fgr_tf import export


def test_soak_rejects_every_invalid_request_and_does_not_grow(tmp_path):
  keras.utils.set_random_seed(0)
  model = fgr_tf.models.build("small_cnn", 10, (28, 28, 1))
  export_dir = export.export_saved_model(model, str(tmp_path / "served"))
  stats = serving_soak.soak(export_dir, requests=400, warmup=100)
  assert stats["wrong"] == []
  assert stats["accepted"] > 50 and stats["rejected"] > 50
  # 300 requests after the warm-up: no leak (a leak of one batch per
  # request would be >= 300 * 3 KiB per image...; allow allocator noise).
  assert stats["rss_end_mb"] - stats["rss_warm_mb"] < 25, stats
