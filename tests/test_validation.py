"""Bad images and labels get early errors that name the problem."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fgr_tf
from fgr_tf import attacks
from fgr_tf import errors
from fgr_tf import evaluation
from fgr_tf import validation
from helpers import tiny_backbone, tiny_data

GOOD_IMAGES, GOOD_LABELS = tiny_data(n=4)  # [4, 8, 8, 2] in [0, 1], 3 classes


def _with(fn):
  images = GOOD_IMAGES.copy()
  out = fn(images)
  return images if out is None else out


BAD_IMAGES = {
    "rank 3": (GOOD_IMAGES[0], r"shape=\(8, 8, 2\) \(rank 3\)"),
    "uint8": ((GOOD_IMAGES * 255).astype(np.uint8),
              r"dtype=uint8\. Convert with fgr_tf.data.to_unit_float"),
    "strings": (np.full((4, 8, 8, 2), "a"), "dtype=string"),
    "channels": (GOOD_IMAGES[..., :1], "the model expects 2 channels"),
    "0-255 floats": (GOOD_IMAGES * 255, r"values in \[0, 1\].*max 2\d\d.*"
                     "divide by 255"),
    "negative": (GOOD_IMAGES - 0.5, r"values in \[0, 1\]\. Received: min -"),
    "NaN": (_with(lambda x: x.__setitem__((0, 0, 0, 0), np.nan)),
            r"NaN or Inf \(1 values\)"),
    "Inf": (_with(lambda x: x.__setitem__((1, 2, 3, 1), np.inf)),
            "NaN or Inf"),
}
BAD_LABELS = {
    "out of range": (np.array([0, 1, 2, 3]), r"labels must be in \[0, 3\) "
                     "for a model with 3 classes. Received: min 0, max 3"),
    "negative": (np.array([0, -1, 2, 1]), "Received: min -1"),
    "float": (GOOD_LABELS.astype(np.float32), "integer labels.*float32"),
    "one-hot": (np.eye(3, dtype=np.int32)[GOOD_LABELS],
                r"integer labels of shape \[batch\]"),
    "count": (GOOD_LABELS[:3], "4 images but 3 labels"),
}


def _fit(images, labels):
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=1.0)
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  model.fit(images, labels, batch_size=4, verbose=0)


def _flow_pgd(images, labels):
  attacks.flow_pgd(tiny_backbone(), images, labels, steps=1)


def _evaluate(images, labels):
  evaluation.evaluate(tiny_backbone(), (images, labels), ["worst_of_k"])


ENTRY_POINTS = {"FGRModel.fit": _fit, "flow_pgd": _flow_pgd,
                "evaluate": _evaluate}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_are_named(entry, case):
  images, message = BAD_IMAGES[case]
  with pytest.raises(ValueError, match=message):
    ENTRY_POINTS[entry](images, GOOD_LABELS)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD_LABELS)
def test_bad_labels_are_named(entry, case):
  labels, message = BAD_LABELS[case]
  with pytest.raises(ValueError, match=message):
    ENTRY_POINTS[entry](GOOD_IMAGES, labels)


@pytest.mark.parametrize("images, labels, message", [
    (GOOD_IMAGES * 255, GOOD_LABELS, r"\[0, 1\].*divide by 255"),
    (GOOD_IMAGES, np.array([0, 1, 2, 7]), r"labels must be (< 3|in \[0, 3\))"),
    (_with(lambda x: x.__setitem__((0, 0, 0, 0), np.nan)), GOOD_LABELS,
     "images contain NaN or Inf"),
], ids=["0-255", "label 7", "NaN"])
@pytest.mark.parametrize("kind", ["dataset", "generator", "py_dataset"])
@pytest.mark.parametrize("jit", [False, True])
def test_pipelines_are_checked_before_the_training_step(images, labels,
                                                        message, kind, jit):
  """Batches of a tf.data pipeline, a generator or a PyDataset are checked
  before the step, also under XLA (which drops assertion ops)."""
  model = fgr_tf.FGRModel(tiny_backbone(), fgr_lambda=1.0)
  model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit)
  if kind == "dataset":
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
  elif kind == "generator":
    data = ((images[i:i + 2], labels[i:i + 2]) for i in (0, 2))
  else:
    class Batches(keras.utils.PyDataset):
      def __len__(self):
        return 2

      def __getitem__(self, i):
        return images[2 * i:2 * i + 2], labels[2 * i:2 * i + 2]

    data = Batches()
  with pytest.raises(errors.UserError, match=message):
    model.fit(data, verbose=0, epochs=1)
  # Nothing was applied: the bad batch never reached the step.
  if kind != "generator" and not np.isfinite(images).all():
    assert np.isfinite(model.backbone.get_weights()[0]).all()


def test_good_inputs_pass_and_come_back_as_tensors():
  images = validation.check_images(GOOD_IMAGES, "t", channels=2)
  labels = validation.check_labels(GOOD_LABELS, "t", 3, batch=4)
  assert images.dtype == tf.float32 and labels.shape == (4,)
  assert validation.model_shape(tiny_backbone()) == (2, 3)
  column = validation.check_labels(GOOD_LABELS[:, None], "t", 3, batch=4)
  assert column.shape == (4,)  # [N, 1] labels (keras.datasets) are accepted
