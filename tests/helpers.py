"""Small benchmarks and configs the tests share."""

import jax.numpy as jnp
import numpy as np

from bcl_jax.config import default_config
from bcl_jax.data.benchmark import Task, make_benchmark
from bcl_jax.methods import api


def toy_benchmark(n_tasks=3, n_train=47, n_test=23, seed=0):
  """Linearly separable tasks so that learning is visible."""
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(n_tasks):
    w = rng.normal(size=(12, 4))
    def make(n):
      x = rng.random((n, 12)).astype(np.float32)
      return x, np.argmax(x @ w, 1)
    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    tasks.append(Task(xtr, ytr, xte, yte, descriptor=t))
  return make_benchmark("toy", tasks, task_incremental=False)


def tiny_config(**kw):
  """A small-network, small-memory config for any method (method fields
  that a method does not declare go through ``presets.all``)."""
  c = default_config()
  c.hidden = (16,)
  c.presets.all = dict(n_memories=20, replay_batch_size=8)
  c.batch_size = 5
  c.chunk_size = 4
  c.progress = False
  c.heatmap = False
  c.lr = 0.1
  for k, v in kw.items():
    c[k] = v
  return c


def batch(x, y, valid, task) -> api.Batch:
  """An ``api.Batch`` of one task from numpy arrays."""
  y = jnp.asarray(y)
  return api.Batch(jnp.asarray(x), y, jnp.asarray(valid), jnp.int32(task),
                   jnp.full(y.shape, task, jnp.int32))
