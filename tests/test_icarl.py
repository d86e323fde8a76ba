"""iCaRL: herding, the exemplar budget, NME prediction, the numpy reference,
and end-to-end runs on an MLP benchmark and a tiny split CIFAR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import experiment, methods, train
from bcl_jax.config import default_config, resolve
from bcl_jax.data import load_benchmark
from bcl_jax.methods import api, icarl
from bcl_jax.models import build_model

import np_reference as ref
import np_reference_icarl as npi
from helpers import batch as make_batch, tiny_config, toy_benchmark

T, D, BATCH = 3, 8, 5


def make_ctx(n_outputs=6, per_task=2, hidden=(7, 5), d=D, n_tasks=T):
  mask = np.zeros((n_tasks, n_outputs), bool)
  for t in range(n_tasks):
    mask[t, per_task * t:per_task * (t + 1)] = True
  model = build_model("mlp", (d,), n_outputs, hidden=hidden)
  return api.Context(model=model, class_mask=mask, input_shape=(d,),
                     input_dtype=np.float32)


def make_method(ctx, **kw):
  c = default_config()
  c.method = "icarl"
  c.presets.all = dict(lr=0.1, memory_strength=2.0, **kw)
  return methods.make(resolve(c), ctx), resolve(c)


def task_data(x, y, n_rows):
  """``TaskData`` padded with invalid rows, as the loop passes it."""
  n = len(x)
  pad = n_rows - n
  return api.TaskData(
      x=jnp.asarray(np.concatenate([x, np.full((pad, x.shape[1]), 9.0,
                                               np.float32)])),
      y=jnp.asarray(np.concatenate([y, np.zeros(pad, np.int32)])),
      valid=jnp.asarray(np.arange(n_rows) < n),
      tasks=jnp.zeros(n_rows, jnp.int32))


# ------------------------------------------------------------ herding --

def test_herding_order_hand_worked():
  # mu of the members a, b, c is (0.6, 0.5333). Step 1: c (cost 0.0444; the
  # non-member e would win with 0.0417). Step 2: b (0.1111) beats a
  # (0.1444); c again would cost 0.0444 but is taken. Step 3: a.
  a, b, c, e = (1.0, 0.0), (0.0, 1.0), (0.8, 0.6), (0.7071068, 0.7071068)
  feats = jnp.asarray([e, a, b, c], jnp.float32)
  member = jnp.asarray([False, True, True, True])
  order, count = icarl.herding(feats, member, jnp.int32(5), 4)
  assert int(count) == 3
  assert list(np.asarray(order)[:3]) == [3, 2, 1]
  order, count = icarl.herding(feats, member, jnp.int32(2), 4)
  assert int(count) == 2 and list(np.asarray(order)[:2]) == [3, 2]
  # the numpy reference agrees
  assert npi.herding(np.asarray(feats)[1:], 5) == [2, 1, 0]


# --------------------------------------------------------- the budget --

def test_budget_split_as_classes_arrive():
  ctx = make_ctx()
  method, _ = make_method(ctx, n_memories=13)
  state = method.init(jax.random.PRNGKey(0))
  end = jax.jit(method.end_task)
  rng = np.random.default_rng(1)
  expected_m = [6, 3, 2]  # 13 // 2, 13 // 4, 13 // 6
  before = None
  herd = jax.jit(icarl.herding, static_argnums=3)
  feats_of = jax.jit(ctx.model.features)
  for t in range(T):
    y = np.repeat([2 * t, 2 * t + 1], [9, 3 if t == 0 else 8]).astype(
        np.int32)  # class 1 has only 3 rows: it keeps them all at first
    x = rng.random((len(y), D)).astype(np.float32)
    data = task_data(x, y, 20)
    state = end(state, jnp.int32(t), data)
    mem = jax.device_get(state.memory)
    counts = [int(np.sum(mem.filled & (mem.cls == s))) for s in range(6)]
    m = expected_m[t]
    want = [min(m, 3) if s == 1 else m if s < 2 * (t + 1) else 0
            for s in range(6)]
    assert counts == want, (t, counts)
    assert sum(counts) <= 13
    # new exemplars: the first m of the class's herding order
    feats = icarl.normalize(feats_of(state.variables, data.x))
    for s in (2 * t, 2 * t + 1):
      order, n = herd(feats, data.valid & (data.y == s),
                               jnp.int32(m), 6)
      got = mem.x[mem.filled & (mem.cls == s)][
          np.argsort(mem.rank[mem.filled & (mem.cls == s)])]
      np.testing.assert_array_equal(got, np.asarray(data.x)[
          np.asarray(order)[:int(n)]])
    # old classes keep a prefix of their previous order
    if before is not None:
      for s in range(2 * t):
        keep = mem.filled & (mem.cls == s)
        old = before.filled & (before.cls == s) & (before.rank < m)
        np.testing.assert_array_equal(
            mem.x[keep][np.argsort(mem.rank[keep])],
            before.x[old][np.argsort(before.rank[old])])
    before = mem


def test_too_small_budget_and_featureless_model_are_refused():
  with pytest.raises(ValueError, match=r"n_memories \(5\) .* number of "
                     r"classes \(6\)"):
    make_method(make_ctx(), n_memories=5)
  ctx = make_ctx()
  bare = api.Context(ctx.model._replace(features=None), ctx.class_mask,
                     ctx.input_shape, ctx.input_dtype)
  with pytest.raises(ValueError, match="penultimate features"):
    make_method(bare, n_memories=20)


# -------------------------------------------------------------- NME --

def test_nme_prediction_hand_worked():
  # features = relu(x) (identity 2 -> 2); task 0: classes 0, 1, 2 (2 has no
  # exemplars), task 1: 3, 4, 5 (only 3 has exemplars).
  ctx = make_ctx(n_outputs=6, per_task=3, hidden=(2,), d=2, n_tasks=2)
  method, _ = make_method(ctx, n_memories=8)
  state = method.init(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(np.asarray, state.variables["params"])
  params["Dense_0"]["kernel"] = np.eye(2, dtype=np.float32)
  params["Dense_0"]["bias"] = np.zeros(2, np.float32)
  x = np.zeros((8, 2), np.float32)
  x[:4] = [[2, 0], [0, 1], [0, 3], [5, 5]]
  mem = state.memory._replace(
      x=jnp.asarray(x), cls=jnp.asarray([0, 0, 1, 3, -1, -1, -1, -1]),
      rank=jnp.asarray([0, 1, 0, 0, 0, 0, 0, 0]),
      filled=jnp.asarray(np.arange(8) < 4))
  state = state._replace(variables={"params": params, "batch_stats": {}},
                         memory=mem)
  prepared = jax.jit(method.prepare_eval)(state, jnp.int32(1))
  predict = jax.jit(method.predict)
  q = jnp.asarray([[3.0, 4.0]])  # normalised (0.6, 0.8)
  # class 0: mean of (1, 0) and (0, 1), renormalised (0.7071, 0.7071);
  # class 1: (0, 1); class 3: (0.7071, 0.7071).
  d0 = np.sqrt((0.6 - 0.5 ** 0.5) ** 2 + (0.8 - 0.5 ** 0.5) ** 2)  # 0.1418
  d1 = np.sqrt(0.6 ** 2 + 0.2 ** 2)  # 0.6325
  s0 = np.asarray(predict(prepared, q, jnp.int32(0)))[0]
  np.testing.assert_allclose(s0[:2], [-d0, -d1], rtol=1e-5)
  assert np.all(s0[2:] == icarl.NO_SCORE)
  s1 = np.asarray(predict(prepared, q, jnp.int32(1)))[0]
  np.testing.assert_allclose(s1[3], -d0, rtol=1e-5)
  assert np.all(s1[[0, 1, 2, 4, 5]] == icarl.NO_SCORE)
  # (0, 1) is nearest to class 1
  s = np.asarray(predict(prepared, jnp.asarray([[0.1, 1.0]]),
                                jnp.int32(0)))[0]
  assert int(np.argmax(s)) == 1


# ------------------------------------------------- the numpy reference --

def stream(ctx, seed=0, n_batches=4):
  """Batches per task, the last one short. Each class gets >= 3 rows: with
  two, herding's first pick is an exact tie that rounding decides."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(T):
    cols = np.nonzero(ctx.class_mask[t])[0]
    n_real = BATCH * (n_batches - 1) + 3
    labels = rng.permutation(np.resize(cols, n_real)).astype(np.int32)
    labels = np.concatenate([labels, np.zeros(2, np.int32)])
    batches = []
    for b in range(n_batches):
      x = rng.random((BATCH, D)).astype(np.float32)
      y = labels[b * BATCH:(b + 1) * BATCH]
      valid = np.arange(BATCH) < (BATCH if b < n_batches - 1 else 3)
      batches.append((x, y, valid))
    out.append(batches)
  return out


def assert_memory_matches(mem, ex: npi.Exemplars, what):
  mem = jax.device_get(mem)
  assert int(mem.filled.sum()) == sum(len(v) for v in ex.x.values()), what
  for s, xs in ex.x.items():
    keep = mem.filled & (mem.cls == s)
    o = np.argsort(mem.rank[keep])
    np.testing.assert_array_equal(mem.x[keep][o], xs, err_msg=f"{what} {s}")
    np.testing.assert_allclose(mem.logits[keep][o], ex.logits[s], rtol=2e-4,
                               atol=2e-5, err_msg=f"{what} logits {s}")


@pytest.mark.parametrize("heads,n_mem", [("task", 12), ("single", 36)])
def test_observe_end_task_predict_match_numpy(heads, n_mem):
  ctx = make_ctx()
  if heads == "single":  # every task owns all columns (permuted MNIST)
    ctx = api.Context(ctx.model, np.ones_like(ctx.class_mask), (D,),
                      np.float32)
  method, c = make_method(ctx, n_memories=n_mem)
  key = jax.random.PRNGKey(3)
  state = method.init(key)
  P = ref.from_flax(jax.device_get(state.variables["params"]))
  ex = npi.Exemplars(ctx.class_mask, n_mem)
  observe, end = jax.jit(method.observe), jax.jit(method.end_task)
  predict, prepare = jax.jit(method.predict), jax.jit(method.prepare_eval)
  probe = np.random.default_rng(9).random((7, D)).astype(np.float32)
  for t, batches in enumerate(stream(ctx)):
    for b, (x, y, valid) in enumerate(batches):
      k = jax.random.fold_in(key, 100 * t + b)
      state, m = observe(state, make_batch(x, y, valid, t), k)
      assert np.isfinite(float(m["loss"]))
      P = npi.observe(P, ex, x[valid], y[valid], t, k, c.lr,
                      c.memory_strength)
      got = ref.from_flax(jax.device_get(state.variables["params"]))
      for i, (lg, lr_) in enumerate(zip(got, P)):
        for a, w in zip(lg, lr_):
          np.testing.assert_allclose(a, w, rtol=2e-4, atol=2e-5,
                                     err_msg=f"task {t} batch {b} layer {i}")
    xs = np.concatenate([x[v] for x, _, v in batches])
    ys = np.concatenate([y[v] for _, y, v in batches])
    state = end(state, jnp.int32(t), task_data(xs, ys, 24))
    ex.end_task(P, t, xs, ys)
    assert_memory_matches(state.memory, ex, f"after task {t}")
    prepared = prepare(state, jnp.int32(t))
    for j in range(T):
      got = np.asarray(predict(prepared, jnp.asarray(probe), jnp.int32(j)))
      want = ex.nme_scores(P, probe, j)
      seen = ~np.isnan(want[0])
      np.testing.assert_allclose(got[:, seen], want[:, seen], rtol=1e-4,
                                 atol=1e-5, err_msg=f"task {t} eval {j}")
      assert np.all(got[:, ~seen] == icarl.NO_SCORE)


# ----------------------------------------------------------- end to end --

def test_end_to_end_mlp(tmp_path):
  bench = toy_benchmark(n_tasks=3, n_train=40, n_test=30)
  config = tiny_config(method="icarl", n_tasks=0, eval_init=False)
  res = experiment.run(config, str(tmp_path), log=lambda *a: None,
                       bench=bench)
  acc = np.asarray(res["accuracy_matrix"])
  assert acc.shape == (3, 3) and np.all((acc >= 0) & (acc <= 1))
  # 4 classes per task: the nearest mean of exemplars beats chance on the
  # task just learned
  assert np.mean(np.diag(acc)) > 0.4
  for k in ("acc", "fm", "la"):
    assert np.isfinite(res["metrics"][k])


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
  from data_helpers import _prepare, write_cifar_pickles
  root = tmp_path_factory.mktemp("cifar")
  src = write_cifar_pickles(root)
  _prepare("cifar100", "--source", str(src), "--out-dir", str(root / "data"))
  return root / "data"


@pytest.mark.slow  # ~1-3 min on a shared CPU: compiling the ResNet programs
def test_end_to_end_tiny_split_cifar_resnet(cifar_data):
  """Reduced ResNet-18 with BatchNorm, uint8 exemplars, 5 classes a task."""
  from data_helpers import _config
  config = _config("cifar", data_path=str(cifar_data), method="icarl")
  out = train.train_and_evaluate(config, load_benchmark(config),
                                 log=lambda *a: None)
  assert out["setup"].ctx.model.name == "resnet18_reduced"
  acc = out["accuracy"]
  assert acc.shape == (1, 2, 2) and np.all((acc >= 0) & (acc <= 1))
  mem = jax.tree_util.tree_map(lambda a: np.asarray(a[0]),
                               out["state"].memory)
  assert mem.x.dtype == np.uint8
  # 20 slots over 10 classes: 2 each after the second task, all finite
  counts = [int(np.sum(mem.filled & (mem.cls == s))) for s in range(10)]
  assert counts == [2] * 10
  assert np.all(np.isfinite(mem.logits))
