"""scripts/bench.py's FLOP counter against hand counts."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from bcl_jax import train
from helpers import tiny_config, toy_benchmark

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench.py")
_SPEC = importlib.util.spec_from_file_location("bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_mlp_observe_step_matches_hand_count():
  """``single`` on a 12-16-4 MLP, batch 5: forward 2*B*(12*16 + 16*4);
  backward the same for the weight gradients plus 2*B*16*4 for the hidden
  layer's input gradient (the inputs themselves get none)."""
  setup = train.build(tiny_config(method="single"), toy_benchmark())
  state = train.init_state(setup)
  b, macs = 5, 12 * 16 + 16 * 4
  hand = 2 * b * macs + 2 * b * macs + 2 * b * 16 * 4
  assert bench.observe_flops(setup, state) == hand


def test_bcl_dual_mlp_step_counts_every_pass():
  """bcl_dual with n_meta x (inner_steps x (batch + replay) + outer) rows:
  each pass is one forward + backward of the MLP as above."""
  c = tiny_config(method="bcl_dual", inner_steps=2, n_meta=3)
  setup = train.build(c, toy_benchmark())
  state = train.init_state(setup)
  macs, first = 12 * 16 + 16 * 4, 12 * 16
  per_row = 2 * macs + 2 * macs + 2 * (macs - first)
  # n_memories 20 -> 16 episodic + 4 generalisation slots; replay
  # min(16, 8) = 8, outer min(3 tasks * 4, 8) = 8.
  rows = 3 * (2 * (5 + 8) + 8)
  assert bench.step_rows("bcl_dual", train.methods.hparams_of(
      setup.config), 5, 1, 3) == (rows, 3 * (2 * (5 + 8) + 8))
  assert bench.observe_flops(setup, state) == rows * per_row


def test_scan_cond_and_conv_counts():
  a = jnp.ones((2, 3))
  w = jnp.ones((3, 4))

  def f(a, w):
    def body(c, _):
      return c, c @ w
    _, ys = jax.lax.scan(body, a, None, length=5)
    big = jax.lax.cond(ys.sum() > 0, lambda: (a @ w) @ w.T, lambda: a)
    return ys, big

  dot = 2 * 2 * 3 * 4
  # The scan body 5 times; the cond's larger branch (two dots).
  assert bench.jaxpr_flops(jax.make_jaxpr(f)(a, w)) == 5 * dot + 2 * dot
  x = jnp.ones((1, 5, 5, 2))
  k = jnp.ones((3, 3, 2, 4))
  conv = jax.make_jaxpr(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
  assert bench.jaxpr_flops(conv) == 2 * 25 * 4 * 9 * 2


@pytest.mark.parametrize("t,useful,computed", [
    (0, 1 * (2 * 10 + 13), 2 * 10 + 64),
    (1, 2 * (10 + 52) + 26, 2 * (10 + 52) + 64),
    (3, 2 * (10 + 52) + 52, 2 * (10 + 52) + 64),
    (4, 2 * (10 + 52) + 65, 2 * (10 + 52) + 128),
    (16, 2 * (10 + 52) + 128, 2 * (10 + 52) + 128)])
def test_step_rows_cifar_bcl_dual(t, useful, computed):
  """Paper hyper-parameters on split CIFAR: 52 episodic + 13 generalisation
  slots, replay 52, outer min((t + 1) * 13, 128) of 128. Without skips every
  row is computed; with them no replay at task 0 and the outer draw in
  buckets of 64 and 128."""
  hp = dict(n_memories=65, n_val=0.2, replay_batch_size=128, inner_steps=2,
            n_meta=1)
  hp = train.methods.api.HParams(hp)
  assert bench.step_rows("bcl_dual", hp, 10, t, 17) == (
      2 * (10 + 52) + 128, useful)
  assert bench.step_rows("bcl_dual", hp, 10, t, 17, skip_replay=True,
                         buckets=True) == (computed, useful)


@pytest.mark.parametrize("t,computed", [
    (0, 3 * 13), (1, 3 * 62), (4, 2 * 62 + 128), (16, 2 * 62 + 128)])
def test_step_rows_cifar_bcl_dual_fused(t, computed):
  """The fused passes on split CIFAR at use=500: instances of 13, 62 and
  128 rows; task 0's passes (10 and 13 rows) use 13, later inner passes
  (10 + 52 rows) 62, the outer draw 62 on tasks 1-3 and 128 from task 4."""
  hp = train.methods.api.HParams(dict(
      n_memories=65, n_val=0.2, replay_batch_size=128, inner_steps=2,
      n_meta=1))
  useful = bench.step_rows("bcl_dual", hp, 10, t, 17)[1]
  assert bench.step_rows("bcl_dual", hp, 10, t, 17,
                         fused=(13, 62, 128)) == (computed, useful)


def test_whole_run_estimate_follows_rows():
  """With rows per task, later tasks are interpolated by their rows: equal
  rows, equal cost (tasks 1 and 2 at the early rate here)."""
  res = {"phases": {"task 0": {"ms": 1.0}, "early": {"ms": 2.0},
                    "late": {"ms": 4.0}}, "eval_s": 0.0, "compile_s": 0.0}
  rows = {1: 10, 2: 10, 3: 20}
  assert bench.whole_run_estimate(res, 4, 1000, rows.get) == pytest.approx(
      1 + 2 + 2 + 4)


def test_whole_run_estimate_by_schedule():
  """Sequential: task 0 at its rate, later tasks interpolated early -> late,
  one evaluation per task; joint: one phase over every task's data."""
  seq = {"phases": {"task 0": {"ms": 1.0}, "early": {"ms": 2.0},
                    "late": {"ms": 4.0}}, "eval_s": 0.5, "compile_s": 3.0}
  # 3 tasks x 100 steps: 100 * (1 + 2 + 4) ms, 3 evaluations, compile.
  assert bench.whole_run_estimate(seq, 3, 100) == pytest.approx(
      0.7 + 1.5 + 3.0)
  joint = {"phases": {"joint": {"ms": 2.0}}, "eval_s": 0.5, "compile_s": 3.0,
           "epochs": 2}
  # 2 epochs over 3 tasks x 100 steps at 2 ms, one evaluation.
  assert bench.whole_run_estimate(joint, 3, 100) == pytest.approx(
      1.2 + 0.5 + 3.0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU names")
def test_profile_phase_accounts_the_chunks_kernels():
  """``--profile``: one more pass of a phase under jax.profiler; the state
  it returns continues the run and the table covers the MLP's matmuls."""
  from bcl_jax import evaluation
  setup = train.build(tiny_config(method="single"), toy_benchmark())
  state = train.init_state(setup)
  ev = evaluation.Evaluator(setup.method, setup.bench, setup.axis, 100)
  ph = train.phase(setup, 0)
  data = setup.axis.place_shared(ph.data)
  state, _ = train._train_phase(setup, state, ph, data, ev.tests, desc="",
                                progress=False)   # compiles the chunk
  state, prof = bench.profile_phase(setup, state, ph, data, ev.tests)
  rows = {r["category"]: r for r in prof["rows"]}
  # 47 images in batches of 5: 10 steps, each one forward + backward of a
  # two-layer MLP (five dots: two forward, three backward).
  assert rows["library matmul"]["calls"] >= 3
  assert sum(r["share"] for r in prof["rows"]) == pytest.approx(1.0)
  assert prof["wall_ms"] > 0 and prof["phase"] == 0
  ev(state, 0)   # the returned state is live (the one passed was donated)
