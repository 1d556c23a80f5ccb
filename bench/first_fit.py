"""Seconds to a model's first trained batches: what `fit` spends tracing.

  python -m bench.first_fit --model vgg11 --batch 128

Times `FGRModel.fit` on two batches of synthetic images, twice in one
process: the first call traces the training step (and builds the
optimizer and the metrics), the second reuses that trace. Prints both
times and how often the training step was traced (once; Keras traced it
twice without a distribution strategy, the second time because the
optimizer's variables were created inside the first trace, until
FGRModel built them beforehand).
"""

import os
import time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

import fgr_tf  # noqa: E402
from bench import steps  # noqa: E402


class CountingFGRModel(fgr_tf.FGRModel):
  """An FGRModel that counts the traces of its steps ({"train", "test"}):
  their Python runs once per trace."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.traces = {"train": 0, "test": 0}

  def train_step(self, data):
    self.traces["train"] += 1
    return super().train_step(data)

  def test_step(self, data):
    self.traces["test"] += 1
    return super().test_step(data)


def run(model_name, batch, size, channels, classes, fgr_lambda):
  """{"first_s", "second_s" (seconds of each `fit` over two batches),
  "traces" (of the training step)}."""
  images, labels = steps.synthetic_batch(2 * batch, size, channels, classes)
  backbone = fgr_tf.backbones.build(model_name, classes,
                                    (size, size, channels))
  model = CountingFGRModel(backbone, fgr_lambda=fgr_lambda)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                metrics=["accuracy"])
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    model.fit(images, labels, batch_size=batch, epochs=1, shuffle=False,
              verbose=0)
    seconds.append(time.perf_counter() - start)
  return {"first_s": seconds[0], "second_s": seconds[1],
          "traces": model.traces["train"]}


def main(argv):
  del argv
  f = flags.FLAGS
  result = run(f.model, f.batch, f.image_size, f.channels, f.classes,
               f.fgr_lambda)
  print(f"{f.model} {f.image_size}x{f.image_size}x{f.channels}, batch "
        f"{f.batch}, fgr_lambda {f.fgr_lambda:g}: first fit (2 batches) "
        f"{result['first_s']:.2f} s, second {result['second_s']:.2f} s; "
        f"training step traced {result['traces']} time(s)")


if __name__ == "__main__":
  # --model, --batch, --image_size, --channels and --classes are
  # bench.steps' flags (defined when it is imported).
  flags.DEFINE_float("fgr_lambda", 100.0, "FGR weight (0: plain training).")
  app.run(main)
