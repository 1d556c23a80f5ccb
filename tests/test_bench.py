"""The benchmark runs (its speed is not tested here)."""

import importlib
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import fgr_tf
from bench import attacks
from bench import batch_norm
from bench import conv
from bench import first_fit
from bench import flop_bound
from bench import profile_ops
from bench import steps
from bench import switches
from helpers import float32_tolerance
from helpers import ROOT

# The bench modules run as scripts (torch_original runs in a PyTorch venv).
_MAINS = sorted(path.stem for path in (ROOT / "bench").glob("*.py")
                if "__main__" in path.read_text() and
                path.stem != "torch_original")


def test_bench_smoke_reports_every_mode():
  results = steps.run("small_cnn", batch=4, size=8, channels=1, classes=3,
                      warmup=1, repeats=1,
                      modes=list(steps.MODES) + list(steps.OTHER_MODES))
  assert set(results) == set(steps.MODES) | set(steps.OTHER_MODES)
  assert all(r["median"] > 0 and r["best"] >= r["median"]
             for r in results.values())
  text = steps.format_results(results, "header")
  assert "FGR step time / plain step time" in text


def test_bench_flow_pgd_step_makes_the_attacks_adversarial_images():
  images, labels = steps.synthetic_batch(4, 8, 1, 3)
  backbone = fgr_tf.backbones.build("small_cnn", 3, (8, 8, 1))
  adv = steps.make_step("flow_pgd", backbone, images, labels, False)()
  expected = fgr_tf.attacks.flow_pgd(backbone, images, labels, epsilon=0.01,
                                     steps=10).adv_images
  assert adv.shape == (4, 8, 8, 1)
  # The same attack graph, inlined into the step's: images in [0, 1] may
  # differ by round-off only (equal to the bit when measured).
  assert abs(adv - expected.numpy()).max() <= float32_tolerance(1.0, 64)


def test_bench_rejects_unknown_mode():
  with pytest.raises(ValueError, match="Unknown modes \\['fast'\\]"):
    steps.run("small_cnn", 4, 8, 1, 3, 1, 1, ["fast"])


@pytest.mark.parametrize("switch", sorted(switches.SWITCHES))
def test_switches_bench_runs_and_restores_the_defaults(switch):
  times = switches.run(switch, ["eval", "flow_pgd", "fgr"], "small_cnn",
                       batch=2, size=8, channels=1, classes=3, traces=1,
                       calls=1)
  assert all(len(ms) == 1 and ms[0] > 0 for by_setting in times.values()
             for ms in by_setting.values())
  assert "mean off / mean on" in switches.format_times(times)
  _assert_defaults()


def test_paired_switch_rounds_alternate_and_restore_the_defaults():
  """`--paired_rounds`: one trace per setting, then alternating rounds
  (the same for every switch: `switches.alternate`)."""
  paired = switches.run_paired("bn_second", ["fgr"], "small_cnn", batch=2,
                               size=8, channels=1, classes=3, rounds=2,
                               calls=1)
  assert all(len(ms) == 2 and min(ms) > 0 for ms in paired["fgr"].values())
  assert "off / on per round" in switches.format_times(paired)
  _assert_defaults()
  order = []
  switches.alternate(order.append, 3)
  assert order == ["on", "off", "off", "on", "on", "off"]


def _assert_defaults():
  assert fgr_tf.backbones.pooling.LOOP_GRADIENT == "xla"
  assert fgr_tf.backbones.pooling.SECOND_DERIVATIVE == "xla"
  assert fgr_tf.backbones.train_batch_norm.ELEMENTWISE == "xla"
  assert fgr_tf.attacks.common.DEFORM_BY_XLA
  assert importlib.import_module("fgr_tf.attacks.adef").FIRST_BLOCK == "xla"
  assert "FGR_TF_FOLD_BATCHNORM" not in os.environ


def test_attacks_bench_times_a_switch_paired_and_restores_the_default():
  """`bench.attacks --paired_switch`: each setting on its own copy of the
  model, alternating rounds; ADef's first-block switch is read at the
  call, so both paths run (the XLA one only with the switch on)."""
  keras.utils.set_random_seed(0)
  model = fgr_tf.backbones.build("small_cnn", 3, (12, 12, 1))
  models = {"on": model, "off": keras.models.clone_model(model)}
  models["off"].set_weights(model.get_weights())
  images = np.random.default_rng(0).uniform(size=(8, 12, 12, 1)).astype(
      np.float32)
  labels = np.argmax(model(images), -1)
  adef = importlib.import_module("fgr_tf.attacks.adef")
  used = []
  gradients = adef._candidate_flow_gradients  # pylint: disable=protected-access
  def counted(*args, **kwargs):
    used.append(adef.FIRST_BLOCK)
    return gradients(*args, **kwargs)
  adef._candidate_flow_gradients = counted
  try:
    seconds = attacks.time_paired(models, "adef", dict(max_iter=2), images,
                                  labels, "adef_first_block", rounds=2)
  finally:
    adef._candidate_flow_gradients = gradients
  assert used and set(used) == {"xla"}  # traced on the "on" copy only
  assert all(len(s) == 2 and min(s) > 0 for s in seconds.values())
  assert adef.FIRST_BLOCK == "xla"
  assert "off / on per round" in attacks.format_paired("m", "adef", seconds,
                                                       8)
  with pytest.raises(ValueError, match="Unknown switch 'fast'"):
    attacks.time_paired(models, "adef", {}, images, labels, "fast", 1)


def test_batch_norm_bench_runs_and_its_implementations_agree():
  results = batch_norm.run((2, 4, 4, 3), repeats=1)
  assert set(results) == set(batch_norm.IMPLEMENTATIONS)
  # diff: largest difference of float32 second-order gradients over their
  # largest entry. Sums over batch * h * w = 32 terms: mean and variance,
  # their 2 backward sums, and back through all 4.
  bound = float32_tolerance(1.0, reduction=2 * 4 * 4, depth=8)
  for name, (first_ms, second_ms, diff) in results.items():
    assert first_ms > 0 and second_ms > 0
    assert diff <= bound, (name, diff, bound)


def test_profile_ops_counts_the_convolutions_of_a_step(tmp_path):
  times = profile_ops.profile("plain", "small_cnn", batch=4, size=8,
                              channels=1, classes=3, warmup=1, num_steps=1,
                              logdir=str(tmp_path))
  assert any("Conv2D" in op for op in times), sorted(times)
  assert all(ms >= 0 and calls > 0 for ms, calls in times.values())
  assert "all ops" in profile_ops.format_table(times, top=5)


def test_profile_ops_groups_by_layer(tmp_path):
  times = profile_ops.profile("fgr", "small_cnn", batch=4, size=8,
                              channels=1, classes=3, warmup=1, num_steps=1,
                              logdir=str(tmp_path), by_layer=True)
  assert {"conv0", "conv1"} <= set(times), sorted(times)


def test_conv_bench_runs_and_the_forms_agree():
  rows = conv.run([(2, 3, 4), (4, 3, 4)], batch=2, repeats=1, rounds=1)
  for shape, times, diffs in rows:
    assert set(times) == {"conv2d", "im2col", "winograd"}
    assert min(min(t) for t in times.values()) > 0
    # diff: as above, for the kernel's second-order gradient: the conv
    # (3 * 3 * 3 terms), its input gradient (3 * 3 * 4), and back through
    # both to the kernel (batch * h * w <= 32).
    bound = float32_tolerance(1.0, reduction=3 * 3 * 4, depth=4)
    assert max(diffs.values()) <= bound, (shape, diffs, bound)


def test_flop_bound_counts_vgg11_by_hand():
  model = fgr_tf.backbones.build("vgg11", 10, (32, 32, 3))
  # (pixels, C_in, C_out) of VGG-11's 3x3 convs at 32x32, then the classifier.
  convs = [(1024, 3, 64), (256, 64, 128), (64, 128, 256), (64, 256, 256),
           (16, 256, 512), (16, 512, 512), (4, 512, 512), (4, 512, 512)]
  by_hand = sum(2 * p * 9 * i * o for p, i, o in convs) + 2 * 512 * 10
  assert attacks.forward_flops(model) == by_hand
  rates = flop_bound.bound_images_per_s(by_hand, 100.0)
  assert rates["eval"] == 100e9 / by_hand
  assert rates["fgr"] * 6 == rates["eval"] == rates["flow_pgd"] * 20


def test_first_fit_bench_counts_one_trace():
  result = first_fit.run("small_cnn", batch=4, size=8, channels=1, classes=3,
                         fgr_lambda=10.0)
  assert result["traces"] == 1


@pytest.mark.parametrize("module", _MAINS)
def test_bench_script_starts(module):
  """`python -m bench.<module> --help` prints its usage: its flags do not
  clash with those of the bench modules it imports (absl raises
  DuplicateFlagError at start-up: bench.flop_bound did, once bench.attacks
  imported bench.switches at the top)."""
  proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--help"],
                        capture_output=True, text=True, cwd=ROOT,
                        timeout=300, check=False)
  text = proc.stdout + proc.stderr
  assert "Traceback" not in text, text[-3000:]
  assert re.search("usage|flags", text, re.IGNORECASE), text[-3000:]
