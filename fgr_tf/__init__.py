"""fgr_tf: Flow Gradient Regularization for TensorFlow / Keras.

Xia & Li, "Improving Resistance to Adversarial Deformations by Regularizing
Gradients", Neurocomputing 455 (2021).

The library: the warp, the penalties, `FGRModel`, backbones, attacks,
evaluation, the robustness callback, data pipelines, export and
distribution; it takes plain arguments. Training from configs, workdirs,
sweeps, reports and the fgr-* tools are in `fgr_tf.experiment`, which the
library never imports.
"""

from fgr_tf import attacks
from fgr_tf import backbones
from fgr_tf import callbacks
from fgr_tf import data
from fgr_tf import distribute
from fgr_tf import errors
from fgr_tf import evaluation
from fgr_tf.fgr_model import FGRModel
from fgr_tf.fgr_model import tensor_float_32
from fgr_tf.regularizers import flow_gradient_penalty
from fgr_tf.regularizers import input_gradient_penalty
from fgr_tf.warp import dense_image_warp
from fgr_tf.warp import normalized_to_pixel_flow
from fgr_tf.warp import pixel_flow_gradient_to_normalized
from fgr_tf.warp import pixel_to_normalized_flow
from fgr_tf.warp import random_deform

__version__ = "0.2.0"

__all__ = [
    "FGRModel",
    "attacks",
    "backbones",
    "callbacks",
    "data",
    "dense_image_warp",
    "distribute",
    "errors",
    "evaluation",
    "flow_gradient_penalty",
    "input_gradient_penalty",
    "normalized_to_pixel_flow",
    "pixel_flow_gradient_to_normalized",
    "pixel_to_normalized_flow",
    "random_deform",
    "tensor_float_32",
]
