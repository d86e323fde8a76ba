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


def test_lca_hand_worked():
  # Two tasks, 3 points each (beta = 2): task 0 curve 0.1, 0.4, 0.7 (mean
  # 0.4); task 1 curve 0.2, 0.5, 0.5 (mean 0.4) -> LCA_2 = 0.4.
  curve = np.array([[0.1, 0.4, 0.7, 0.9],
                    [0.2, 0.5, 0.5, 0.9]])
  assert metrics.lca(curve[:, :3]) == pytest.approx(0.4)
  assert metrics.lca(curve, beta=2) == pytest.approx(0.4)
  # beta = 0: the accuracy before any batch, (0.1 + 0.2) / 2.
  assert metrics.lca(curve, beta=0) == pytest.approx(0.15)
  # All 4 points: Z_b = 0.15, 0.45, 0.6, 0.9 -> mean 0.525.
  assert metrics.lca(curve) == pytest.approx(0.525)
  with pytest.raises(ValueError, match="beta=4 needs 5 points"):
    metrics.lca(curve, beta=4)
  with pytest.raises(ValueError, match="acc_curve must be"):
    metrics.lca([0.1, 0.2])


def test_mean_std_is_the_sample_std():
  # Values 1, 2, 3, 4: mean 2.5, squared deviations 5 -> var 5/3.
  m, s = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
  assert m == 2.5 and s == pytest.approx((5 / 3) ** 0.5)
  assert metrics.mean_std([0.7]) == (0.7, 0.0)
