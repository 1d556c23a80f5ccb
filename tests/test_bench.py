"""The benchmark runs (its speed is not tested here)."""

import pytest

from bench import steps


def test_bench_smoke_reports_every_mode():
  results = steps.run("small_cnn", batch=4, size=8, channels=1, classes=3,
                      warmup=1, repeats=1, modes=list(steps.MODES) + list(steps.OTHER_MODES))
  assert set(results) == set(steps.MODES) | set(steps.OTHER_MODES)
  assert all(r["median"] > 0 and r["best"] >= r["median"]
             for r in results.values())
  text = steps.format_results(results, "header")
  assert "FGR step time / plain step time" in text


def test_bench_rejects_unknown_mode():
  with pytest.raises(ValueError, match="Unknown modes \\['fast'\\]"):
    steps.run("small_cnn", 4, 8, 1, 3, 1, 1, ["fast"])
