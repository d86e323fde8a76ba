"""Checkpoints: round trips, resume after SIGKILL, refusals, plain orbax,
the evaluate CLI, and failures (corruption, NaN, Ctrl-C, a full disk)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import checkpoint
from bcl_jax import experiment
from bcl_jax import resume
from bcl_jax import runs as runs_lib
from bcl_jax import train
from helpers import tiny_config, toy_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           JAX_PLATFORMS="cpu")
# 4 tasks of 100 steps: long enough (~0.5 s each) to kill one mid-task.
QUICK = ["--config", "configs/mnist.py:quick", "--config.n_tasks=4",
         "--config.use=1000", "--config.progress=False",
         "--config.heatmap=False"]


def cli(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def accuracy_matrix(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["accuracy_matrix"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted CLI run of QUICK: its workdir."""
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd)
  assert p.returncode == 0, p.stderr
  assert checkpoint.available(wd) == [0, 1, 2, 3]
  return wd


def copy_run(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


# -- in-process round trips ----------------------------------------------------

class Inner(NamedTuple):
  x: jax.Array
  ptr: jax.Array


class Toy(NamedTuple):
  variables: dict
  hp: dict
  memory: Inner
  flags: jax.Array


def toy_state(seed):
  r = np.random.default_rng(seed)
  return Toy(
      variables={"params": {"Dense_0": {"kernel": jnp.asarray(
          r.normal(size=(2, 3, 4)), jnp.float32)}},
                 "batch_stats": {"bn": {"mean": jnp.asarray(
                     r.normal(size=(2, 4)), jnp.float32),
                                        "var": jnp.ones((2, 4), jnp.bfloat16)}},
                 "empty": {}},
      hp={"lr": jnp.asarray([0.1, 0.2], jnp.float32)},
      memory=Inner(x=jnp.asarray(r.integers(0, 255, (2, 3, 5)), jnp.uint8),
                   ptr=jnp.asarray([7, 9], jnp.int32)),
      flags=jnp.asarray([[True, False], [False, True]]))


def test_whole_state_save_restore_equality(tmp_path):
  config = tiny_config()
  runs = [runs_lib.Run(seed=0, hp={"lr": 0.1}),
          runs_lib.Run(seed=1, hp={"lr": .2})]
  m = checkpoint.Manager(str(tmp_path))
  acc = np.asarray(np.random.default_rng(0).random((2, 2, 3)), np.float32)
  for t in range(2):
    m.save(t, toy_state(t), meta=resume.task_meta(acc[:, :t + 1], None, runs),
           config=config.to_dict())
  m.close()
  assert checkpoint.available(str(tmp_path)) == [0, 1]
  for t in range(2):
    want = toy_state(t)
    meta, cfg = checkpoint.read_meta(str(tmp_path), t)
    got = checkpoint.restore_state(str(tmp_path), t, toy_state(99), meta)
    assert jax.tree_util.tree_structure(got) == \
        jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(want),
                    jax.tree_util.tree_leaves(got)):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got_acc, init = resume.accuracy_of(meta)
    assert got_acc.dtype == np.float32 and init is None
    np.testing.assert_array_equal(got_acc, acc[:, :t + 1])
    assert cfg["lr"] == config.lr and meta["runs"][1]["seed"] == 1


def test_background_save_reads_copies_of_the_state(tmp_path):
  """The loop donates the state to the next task right after ``save``
  returns: overwriting every array of it then must not touch the
  checkpoint."""
  wd, config = str(tmp_path), tiny_config()
  runs = [runs_lib.Run(seed=0, hp={"lr": 0.1}),
          runs_lib.Run(seed=1, hp={"lr": .2})]
  m = checkpoint.Manager(wd)
  assert m.background
  acc = np.zeros((2, 1, 3), np.float32)
  state = toy_state(3)
  m.save(0, state, meta=resume.task_meta(acc, None, runs),
         config=config.to_dict())
  overwrite = jax.jit(lambda a: a * 0 + 7, donate_argnums=0)
  for leaf in jax.tree_util.tree_leaves(state):
    overwrite(leaf)        # the buffer reused in place (or freed)
  m.close()
  meta, _ = checkpoint.read_meta(wd, 0)
  got = checkpoint.restore_state(wd, 0, toy_state(99), meta)
  for a, b in zip(jax.tree_util.tree_leaves(toy_state(3)),
                  jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _FailingWrites:
  """An orbax manager stand-in whose background writes fail from task
  ``bad`` on (what a full disk does to the writer thread)."""

  def __init__(self, inner, bad):
    self.inner, self.bad, self.step = inner, bad, None

  def save(self, step, **kw):
    self.step = step
    if step < self.bad:
      return self.inner.save(step, **kw)
    return True

  def wait_until_finished(self):
    self.inner.wait_until_finished()
    if self.step is not None and self.step >= self.bad:
      raise OSError(28, "No space left on device")

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_failed_background_save_is_named_at_the_next_save(tmp_path):
  wd, config = str(tmp_path), tiny_config()
  runs = [runs_lib.Run(seed=0, hp={"lr": 0.1}),
          runs_lib.Run(seed=1, hp={"lr": .2})]
  m = checkpoint.Manager(wd)
  m._mgr = _FailingWrites(m._mgr, bad=1)
  acc = np.zeros((2, 3, 3), np.float32)
  for t in range(2):    # save 1 "fails" in the background, unseen yet
    m.save(t, toy_state(t), meta=resume.task_meta(acc[:, :t + 1], None, runs),
           config=config.to_dict())
  want = (rf"could not write checkpoint {re.escape(m.path(1))} \(.*No space "
          rf"left.*\); the previous checkpoint {re.escape(m.path(0))} is "
          "intact")
  with pytest.raises(checkpoint.CheckpointError, match=want):
    m.save(2, toy_state(2), meta=resume.task_meta(acc, None, runs),
           config=config.to_dict())
  assert checkpoint.available(wd) == [0]
  m.close()    # nothing left in flight
  meta, _ = checkpoint.read_meta(wd, 0)
  checkpoint.restore_state(wd, 0, toy_state(99), meta)


def test_a_run_reports_its_last_checkpoint_failing(tmp_path, monkeypatch):
  """The last task's save fails after training: the run raises, naming it,
  and writes no results."""
  real = checkpoint.Manager.__init__

  def failing(self, *a, **kw):
    real(self, *a, **kw)
    self._mgr = _FailingWrites(self._mgr, bad=toy_benchmark().n_tasks - 1)

  monkeypatch.setattr(checkpoint.Manager, "__init__", failing)
  wd = str(tmp_path / "w")
  last = os.path.join(checkpoint.directory(wd), str(toy_benchmark().n_tasks - 1))
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"could not write checkpoint {re.escape(last)}"):
    experiment.run(tiny_config(), wd, log=lambda *a: None,
                   bench=toy_benchmark())
  assert checkpoint.available(wd) == list(range(toy_benchmark().n_tasks - 1))
  assert not os.path.exists(os.path.join(wd, "results.json"))


def test_training_checkpoints_hold_each_tasks_state(tmp_path):
  config, bench = tiny_config(num_seeds=2), toy_benchmark()
  wd = str(tmp_path)
  m = checkpoint.Manager(wd)
  seen = {}

  def on_task_end(t, state, accuracy, init_accuracy, lca_curve=None):
    seen[t] = jax.tree_util.tree_map(np.array, state)
    m.save(t, state, meta=resume.task_meta(accuracy, init_accuracy,
                                           runs_lib.runs_of(config)),
           config=config.to_dict())

  out = train.train_and_evaluate(config, bench, on_task_end=on_task_end,
                                 log=lambda *a: None)
  m.close()
  for t in range(bench.n_tasks):
    ck = experiment.load(wd, task=t, bench=bench)
    assert type(ck.state) is type(out["state"]) and ck.task == t
    for a, b in zip(jax.tree_util.tree_leaves(seen[t]),
                    jax.tree_util.tree_leaves(ck.state)):
      np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(ck.accuracy, out["accuracy"][:, :t + 1])
    np.testing.assert_array_equal(ck.init_accuracy, out["init_accuracy"])
  assert experiment.load(wd, bench=bench).task == bench.n_tasks - 1


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
  bench = toy_benchmark()
  bench.tasks[1].x_train[:] = np.nan       # task 1 diverges at once
  wd = str(tmp_path / "w")
  with pytest.raises(train.TrainingError, match=r"task 1.*last good "
                     r"checkpoint is .*checkpoints/0 \(after task 1\)"):
    experiment.run(tiny_config(), wd, log=lambda *a: None, bench=bench)
  assert checkpoint.available(wd) == [0]
  assert experiment.load(wd, bench=bench).accuracy.shape == (1, 1, 3)


def test_ctrl_c_then_resume_matches_uninterrupted(tmp_path):
  config, bench = tiny_config(), toy_benchmark()
  full = experiment.run(config, str(tmp_path / "full"), log=lambda *a: None,
                        bench=bench)
  messages = []

  def log(msg):
    messages.append(msg)
    if msg.startswith("task 2/3"):         # after task 1's evaluation
      raise KeyboardInterrupt
  wd = str(tmp_path / "cut")
  with pytest.raises(KeyboardInterrupt):
    experiment.run(config, wd, log=log, bench=bench)
  assert checkpoint.available(wd) == [0]
  assert "last good checkpoint" in messages[-1]
  res = experiment.run(config, wd, log=messages.append, bench=bench)
  assert any(m.startswith("resuming after task 1/3") for m in messages)
  assert res["accuracy_matrix"] == full["accuracy_matrix"]
  assert res["runs"][0]["init_accuracy"] == full["runs"][0]["init_accuracy"]


def test_full_workdir_is_reported_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda p: usage._replace(free=4096))
  messages = []
  with pytest.raises(checkpoint.CheckpointError, match="MiB free"):
    experiment.run(tiny_config(), str(tmp_path / "w"), log=messages.append,
                   bench=toy_benchmark())
  assert not any(m.startswith("task ") for m in messages)


# -- the command line ---------------------------------------------------------

def test_resume_after_sigkill_is_bit_identical(reference, tmp_path):
  wd = str(tmp_path / "killed")
  ck1 = os.path.join(wd, "checkpoints", "1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "bcl_jax.run", *QUICK, "--workdir", wd],
      cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not os.path.isdir(ck1) and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint of task 1"
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)        # task 2 is running
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert checkpoint.available(wd) == [0, 1]
  assert not os.path.exists(os.path.join(wd, "results.json"))
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd)
  assert p.returncode == 0, p.stderr
  assert "resuming after task 2/4" in p.stdout
  assert "task 1/4" not in p.stdout and "task 3/4" in p.stdout
  assert accuracy_matrix(wd) == accuracy_matrix(reference)   # bit for bit
  assert checkpoint.available(wd) == [0, 1, 2, 3]


def test_changed_config_is_refused_naming_the_fields(reference, tmp_path):
  wd = copy_run(reference, tmp_path / "w")
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd, "--config.lr=0.1",
          "--config.n_memories=60", "--config.chunk_size=7")
  assert p.returncode == 2
  err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
  assert len(err) == 1 and "Traceback" not in p.stderr
  assert "lr (checkpoint 0.03, now 0.1)" in err[0]
  assert "n_memories" in err[0] and "chunk_size" not in err[0]
  assert "force_resume" in err[0] and "task 1/4" not in p.stdout


def test_plain_orbax_restores_the_arrays(reference):
  import orbax.checkpoint as ocp
  path = os.path.join(reference, "checkpoints", "3", "state")
  tree = ocp.StandardCheckpointer().restore(path)

  def only_dicts_and_arrays(t):
    if isinstance(t, dict):
      return all(only_dicts_and_arrays(v) for v in t.values())
    return isinstance(t, (jax.Array, np.ndarray))
  assert only_dicts_and_arrays(tree)
  assert set(tree) == {"variables", "hp", "memory", "gen", "soft"}
  ck = experiment.load(reference, task=3)
  assert ck.config.method == "bcl_dual" and ck.config.n_tasks == 4
  want = checkpoint.state_to_tree(ck.state)
  assert jax.tree_util.tree_structure(tree) == \
      jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(tree),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_cli_reproduces_the_saved_row(reference):
  p = cli("bcl_jax.evaluate", "--workdir", reference, "--task", "1")
  assert p.returncode == 0, p.stderr
  row = accuracy_matrix(reference)[1]
  assert " ".join(f"{a:.4f}" for a in row) in p.stdout
  assert "checkpoints/1: after task 2/4 (R[1])" in p.stdout
  assert "equal to the row recorded during training" in p.stdout
  p = cli("bcl_jax.evaluate", "--workdir", reference, "--task", "7")
  assert p.returncode == 2 and "available: [0, 1, 2, 3]" in p.stderr


def test_corrupt_checkpoint_is_named_and_an_earlier_one_resumes(
    reference, tmp_path):
  wd = copy_run(reference, tmp_path / "w")
  data = os.path.join(wd, "checkpoints", "3", "state", "ocdbt.process_0",
                      "d")
  biggest = max((os.path.join(data, f) for f in os.listdir(data)),
                key=os.path.getsize)
  blob = bytearray(open(biggest, "rb").read())
  mid = len(blob) // 2
  blob[mid:mid + 16] = bytes(b ^ 0xFF for b in blob[mid:mid + 16])
  open(biggest, "wb").write(bytes(blob))
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
  assert len(err) == 1
  assert f"checkpoint {wd}/checkpoints/3 is corrupt" in err[0]
  assert "--config.resume_from=2" in err[0]
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd, "--config.resume_from=2")
  assert p.returncode == 0, p.stderr
  assert "resuming after task 3/4" in p.stdout
  assert accuracy_matrix(wd) == accuracy_matrix(reference)
  assert any(n.startswith("checkpoints.superseded-") for n in os.listdir(wd))


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
  config, bench = tiny_config(), toy_benchmark()
  wd = str(tmp_path / "run")
  first = experiment.run(config, wd, log=lambda *a: None, bench=bench)
  before = open(os.path.join(wd, "results.json")).read()
  messages = []
  again = experiment.run(config, wd, log=messages.append, bench=bench)
  assert any("already learned" in m for m in messages)
  assert open(os.path.join(wd, "results.json")).read() == before
  assert again["timing"] == json.loads(before)["timing"]
  assert again["accuracy_matrix"] == first["accuracy_matrix"]


def test_edited_accuracy_in_meta_is_refused(reference, tmp_path):
  wd = copy_run(reference, tmp_path / "w")
  os.remove(os.path.join(wd, "results.json"))
  meta_file = os.path.join(wd, "checkpoints", "3", "meta", "metadata")
  text = open(meta_file).read()
  number = json.dumps(accuracy_matrix(reference)[3][0])
  digit = len(number) - 3
  edited = number[:digit] + str((int(number[digit]) + 1) % 10) + \
      number[digit + 1:]
  assert text.count(number) >= 1
  open(meta_file, "w").write(text.replace(number, edited, 1))
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines() == [
      f"error: checkpoint {wd}/checkpoints/3 is corrupt: its metadata or "
      "config does not match the digest saved with them (edited or "
      "damaged); resume from an earlier one with --config.resume_from=2 "
      "(earlier checkpoints: [0, 1, 2])"]
  assert not os.path.exists(os.path.join(wd, "results.json"))


@pytest.mark.parametrize("module", ["bcl_jax.run", "bcl_jax.evaluate"])
def test_corrupt_array_metadatas_is_one_line(reference, tmp_path, module):
  wd = copy_run(reference, tmp_path / "w")
  folder = os.path.join(wd, "checkpoints", "3", "state", "array_metadatas")
  for name in os.listdir(folder):
    open(os.path.join(folder, name), "w").write("{not json")
  os.remove(os.path.join(wd, "results.json"))
  args = QUICK if module == "bcl_jax.run" else []
  p = cli(module, *args, "--workdir", wd)
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines() == [
      f"error: checkpoint {wd}/checkpoints/3 is corrupt or does not fit this "
      "config's state (array_metadatas/process_0: Expecting property name "
      "enclosed in double quotes: line 1 column 2 (char 1)); resume from an "
      "earlier one with --config.resume_from=2 (earlier checkpoints: "
      "[0, 1, 2])"], p.stderr


def test_checkpoint_older_than_compile_preset_resumes_only_under_default():
  """A config saved before ``compile_preset`` existed was compiled with
  XLA's defaults: it matches ``default`` and differs from any preset."""
  now = train.resolve(tiny_config())
  saved = checkpoint.jsonable(now.to_dict())
  del saved["compile_preset"]
  assert resume.config_diff(saved, now) == []
  fast = train.resolve(tiny_config(compile_preset="fast_compile"))
  assert resume.config_diff(saved, fast) == [
      ("compile_preset", "default", "fast_compile")]
  # Other fields absent on one side still count.
  del saved["seed"]
  assert ("seed", "<absent>", now.seed) in resume.config_diff(saved, now)
