"""The method contract, checked for every registered method.

A new method gets these checks for free: its declaration is coherent, its
state is arrays only (a ``lax.scan`` carry, ``vmap``ped over runs, an orbax
item), its ``predict`` scores ``[N, n_outputs]``, and a tiny run with two
seeds, checkpoints and a resume from the first task gives the same matrix as
the uninterrupted run. ``test_toy_method_is_one_file_and_one_line`` shows
what adding a method takes.
"""

import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import experiment
from bcl_jax import methods
from bcl_jax import train
from bcl_jax.config import default_config, resolve
from bcl_jax.methods import api

from helpers import tiny_config, toy_benchmark


def tiny(method, **kw):
  return tiny_config(method=method, n_tasks=0, use=12, **kw)


@pytest.mark.parametrize("name", methods.names())
def test_declaration(name):
  spec = methods.get(name)
  assert spec.name == name and spec.summary
  assert spec.schedule in api.SCHEDULES
  assert spec.cpu_batching in ("map", "vmap")
  assert len(set(spec.fields)) == len(spec.fields)
  config = resolve(_with_method(name))
  spec.validate(spec.hparams_of(config), config)  # the defaults are valid
  for h in spec.hparams:
    assert h.help
    if h.dynamic:
      assert isinstance(h.default, float), h.name
  # Methods sharing a field agree on its type (one flat config field).
  shared = methods.all_hparams()
  for h in spec.hparams:
    assert type(shared[h.name].default) is type(h.default), h.name


def _with_method(name):
  c = default_config()
  c.method = name
  return c


@pytest.mark.parametrize("name", methods.names())
def test_state_is_arrays_and_predict_scores_every_column(name):
  bench = toy_benchmark(n_tasks=2, n_train=12, n_test=7)
  setup = train.build(tiny(name, num_seeds=2), bench)
  state = train.init_state(setup)
  leaves = jax.tree_util.tree_leaves(state)
  assert leaves and all(isinstance(a, jax.Array) for a in leaves)
  assert all(a.shape[0] == 2 for a in leaves)  # the run axis
  assert sorted(state.hp) == sorted(setup.spec.dynamic)
  one = jax.tree_util.tree_map(lambda a: a[0], state)
  x = jnp.asarray(bench.tasks[0].x_test)
  prepared = jax.jit(setup.method.prepare_eval)(one, jnp.int32(0))
  logits = jax.jit(setup.method.predict)(prepared, x, jnp.int32(1))
  assert logits.shape == (7, bench.n_outputs)
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("name", methods.names())
def test_two_seeds_checkpoint_and_resume_equal_uninterrupted(name, tmp_path):
  bench = toy_benchmark(n_tasks=2, n_train=12, n_test=7)
  config = tiny(name, num_seeds=2)
  full = experiment.run(config, str(tmp_path / "full"), log=lambda *a: None,
                        bench=bench)
  acc = np.asarray(full["accuracy_matrix"])
  assert acc.shape == (2, 2) and np.all((acc >= 0) & (acc <= 1))
  assert [r["seed"] for r in full["runs"]] == [0, 1]
  # Resume after task 0 from the uninterrupted run's checkpoint.
  wd = tmp_path / "resumed"
  shutil.copytree(tmp_path / "full", wd)
  shutil.rmtree(wd / "checkpoints" / "1")
  os.remove(wd / "results.json")
  messages = []
  again = experiment.run(config, str(wd), log=messages.append, bench=bench)
  assert any("resuming after task 1/2" in m for m in messages)
  for a, b in zip(full["runs"], again["runs"]):
    np.testing.assert_array_equal(a["accuracy_matrix"], b["accuracy_matrix"])
  ck = experiment.load(str(wd), task=1, bench=bench)
  assert type(ck.state).__name__ == "State" and ck.accuracy.shape == (2, 2, 2)


# -- adding a method ---------------------------------------------------------

TOY = '''
"""``toy``: SGD on the current batch, then shrink the weights by ``decay``."""
from typing import NamedTuple
import jax
import jax.numpy as jnp
from bcl_jax.methods import api, losses, steps
from bcl_jax.methods import hparams as H

DECAY = api.HParam("decay", 0.5, "weight shrink after each step",
                   dynamic=True)


class State(NamedTuple):
  variables: dict
  hp: dict


def make(hp, ctx):
  model, mask = ctx.model, jnp.asarray(ctx.class_mask)

  def init(key):
    return State(model.init(key), api.init_hp(SPEC, hp))

  def observe(state, batch, key):
    def loss_fn(p, bs, key):
      (z,), new = steps.apply_many(model, {"params": p, "batch_stats": bs},
                                   [batch.x], True, [batch.valid])
      return losses.masked_ce(z, batch.y, mask[batch.task],
                              batch.valid), new["batch_stats"]
    v, loss, _ = steps.grad_step(loss_fn, state.variables, key,
                                 state.hp["lr"])
    v["params"] = jax.tree_util.tree_map(
        lambda a: a * (1 - state.hp["decay"]), v["params"])
    return state._replace(variables=v), {"loss": loss}

  return api.Method(init, api.no_hook, observe, api.no_hook,
                    *api.plain_eval(model))


def validate(hp, config):
  api.check(0 <= hp.decay < 1, f"decay must be in [0, 1), got {hp.decay}")


SPEC = api.MethodSpec(name="toy", summary="toy", hparams=(H.LR, DECAY),
                      make=make, validate=validate)
'''


def test_toy_method_is_one_file_and_one_line(tmp_path, monkeypatch):
  """A method written as one module plus one registry line gets its config
  fields, sweeps, validation, checkpoints and evaluation from the rest."""
  path = tmp_path / "toy_method.py"
  path.write_text(TOY)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(methods._REGISTRY, "toy", "toy_method")  # the line
  methods.get.cache_clear()
  try:
    c = default_config()  # the new field exists, unset
    assert "decay" in c and c.decay is None
    bench = toy_benchmark(n_tasks=2, n_train=12, n_test=7)
    res = experiment.run(tiny("toy", sweep="decay=0.0,0.5"),
                         str(tmp_path / "wd"), log=lambda *a: None,
                         bench=bench)
    assert [r["hp"]["decay"] for r in res["runs"]] == [0.0, 0.5]
    # Each run used its own decay: 0.5 halves the weights at every step.
    kernel = experiment.load(str(tmp_path / "wd"), bench=bench).state \
        .variables["params"]["Dense_1"]["kernel"]
    norms = np.linalg.norm(np.asarray(kernel).reshape(2, -1), axis=1)
    assert norms[1] < 0.1 * norms[0]
    with pytest.raises(ValueError, match="decay must be in"):
      experiment.validate_config(tiny("toy", decay=1.5))
    with pytest.raises(ValueError, match="decay is not a hyper-parameter of "
                       "method 'er'"):
      experiment.validate_config(tiny("er", decay=0.1))
  finally:
    methods.get.cache_clear()
    sys.modules.pop("toy_method", None)
