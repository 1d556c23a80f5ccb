"""Experiment configs: one module per experiment, each with `get_config()`.

The files under the repository's configs/ import these, so
`fgr-train --config=configs/fashion_mnist.py` and
`--config=fgr_tf/experiment/configs/fashion_mnist.py` are the same.
"""
