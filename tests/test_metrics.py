"""Metrics on a hand-worked 3x3 accuracy matrix."""

import numpy as np
import pytest

from bcl_jax import metrics

# R[i, j]: accuracy on task j after training task i.
R = np.array([[0.90, 0.20, 0.10],
              [0.80, 0.95, 0.30],
              [0.70, 0.85, 0.92]])


def test_hand_worked_values():
  # ACC: (0.70 + 0.85 + 0.92) / 3
  assert metrics.acc(R) == pytest.approx(2.47 / 3)
  # FM: j=0: max(0.90, 0.80) - 0.70 = 0.20; j=1: max(0.20, 0.95) - 0.85 = 0.10
  assert metrics.fm(R) == pytest.approx(0.15)
  # LA: (0.90 + 0.95 + 0.92) / 3
  assert metrics.la(R) == pytest.approx(2.77 / 3)
  # BWT: ((0.70 - 0.90) + (0.85 - 0.95)) / 2
  assert metrics.bwt(R) == pytest.approx(-0.15)
  # FWT (reference): ((R[0,1] - R[0,1]) + (R[1,2] - R[0,2])) / 2 = 0.10
  assert metrics.fwt(R) == pytest.approx(0.10)
  # FWT (GEM) with init accuracies b = [0.1, 0.15, 0.05]:
  # ((0.20 - 0.15) + (0.30 - 0.05)) / 2 = 0.15
  assert metrics.fwt_gem(R, [0.1, 0.15, 0.05]) == pytest.approx(0.15)


def test_fm_max_includes_rows_before_the_task_was_learned():
  r = np.array([[0.5, 0.9], [0.6, 0.7]])
  # For j = 0 the max runs over rows < T-1 = row 0 only: 0.5 - 0.6.
  assert metrics.fm(r) == pytest.approx(-0.1)
  r3 = np.array([[0.1, 0.99, 0.0], [0.5, 0.2, 0.0], [0.4, 0.1, 0.0]])
  # j=1: max(R[0,1], R[1,1]) = 0.99 although task 1 was learned at row 1.
  assert metrics.fm(r3) == pytest.approx(((0.5 - 0.4) + (0.99 - 0.1)) / 2)


def test_single_task_and_bad_shapes():
  one = np.array([[0.8]])
  assert metrics.all_metrics(one) == {"acc": 0.8, "fm": 0.0, "la": 0.8,
                                      "bwt": 0.0, "fwt": 0.0}
  with pytest.raises(ValueError, match="square"):
    metrics.acc(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="init_acc"):
    metrics.fwt_gem(R, [0.1, 0.2])


def test_all_metrics_keys():
  m = metrics.all_metrics(R, init_acc=[0.1, 0.1, 0.1])
  assert set(m) == {"acc", "fm", "la", "bwt", "fwt", "fwt_gem"}
