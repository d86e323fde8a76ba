"""Runs that must not harm their workdir or crash: the workdir lock, signals,
checkpoint integrity, memory and disk estimates, config validation."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bcl_jax import checkpoint
from bcl_jax import experiment
from bcl_jax import guard
from bcl_jax import results as results_lib
from bcl_jax.config import default_config
from helpers import tiny_config, toy_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
           JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
# 100 steps per task in chunks of 10: long enough to stop mid-task.
QUICK = ["--config", "configs/mnist.py:quick", "--config.n_tasks=4",
         "--config.use=1000", "--config.progress=False",
         "--config.heatmap=False"]


def quiet(*_):
  pass


def start(*args):
  return subprocess.Popen([sys.executable, "-m", "bcl_jax.run", *args],
                          cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def cli(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def wait_for(cond, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not cond():
    assert proc.poll() is None, f"exited before {what}: {proc.stderr.read()}"
    assert time.time() < deadline, f"no {what}"
    time.sleep(0.02)


def error_lines(stderr):
  return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_clean_stop(proc, sig, out, err):
  want = 130 if sig == signal.SIGINT else 143
  assert proc.returncode == want, (proc.returncode, err)
  assert "Fatal Python error" not in err and "Traceback" not in err, err
  assert err.strip().splitlines() == [
      "error: interrupted" if sig == signal.SIGINT
      else "error: stopped by SIGTERM"], err
  assert "interrupted; " in out


# -- the workdir lock -----------------------------------------------------------

def test_lock_is_exclusive_names_its_holder_and_ignores_stale_files(tmp_path):
  wd = str(tmp_path)
  with guard.WorkdirLock(wd):
    with pytest.raises(guard.LockError, match=rf"workdir {wd} is in use by "
                       rf"another run \(pid {os.getpid()} on host "):
      guard.WorkdirLock(wd).acquire()
  # The file stays with a dead holder's record: flock, not the file, counts.
  with open(os.path.join(wd, guard.LOCK_NAME), "w") as f:
    json.dump({"pid": 999999, "host": "gone", "started": "then"}, f)
  with guard.WorkdirLock(wd):
    info = json.load(open(os.path.join(wd, guard.LOCK_NAME)))
    assert info["pid"] == os.getpid()


@pytest.mark.slow
def test_second_run_is_refused_evaluate_is_not_and_sigterm_stops(tmp_path):
  wd = str(tmp_path / "w")
  first = start(*QUICK, "--workdir", wd)
  try:
    wait_for(lambda: os.path.isdir(os.path.join(wd, "checkpoints", "0")),
             first, "checkpoint 0")
    first.send_signal(signal.SIGSTOP)      # holds the lock, frozen mid-run
    t0 = time.time()
    second = cli("bcl_jax.run", *QUICK, "--workdir", wd)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert error_lines(second.stderr) == [
        f"error: workdir {wd} is in use by another run (pid {first.pid} on "
        f"host {os.uname().nodename} since " +
        json.load(open(os.path.join(wd, guard.LOCK_NAME)))["started"] +
        "); wait for it to finish, or pass another --workdir"]
    assert "benchmark" not in second.stdout     # refused before any work
    assert time.time() - t0 < 120
    # A reader is not blocked, and reads only committed checkpoints.
    ev = cli("bcl_jax.evaluate", "--workdir", wd, "--task", "0")
    assert ev.returncode == 0, ev.stderr
    assert "equal to the row recorded during training" in ev.stdout
  finally:
    first.send_signal(signal.SIGCONT)
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=300)
  assert_clean_stop(first, signal.SIGTERM, out, err)
  steps = checkpoint.available(wd)
  assert steps and not os.path.exists(os.path.join(wd, "results.json"))
  assert f"last good checkpoint is {wd}/checkpoints/{steps[-1]}" in out
  # The lock died with its process: the same command resumes.
  p = cli("bcl_jax.run", *QUICK, "--workdir", wd)
  assert p.returncode == 0, p.stderr
  assert f"resuming after task {steps[-1] + 1}/4" in p.stdout


# -- signals ----------------------------------------------------------------------

def test_signal_stops_at_the_next_boundary_keeping_the_checkpoint(tmp_path):
  wd = str(tmp_path / "w")

  def log(msg):
    if msg.startswith("task 1/3"):
      os.kill(os.getpid(), signal.SIGTERM)   # arrives during the evaluation
  with pytest.raises(guard.Interrupted) as e:
    experiment.run(tiny_config(), wd, log=log, bench=toy_benchmark())
  assert e.value.signum == signal.SIGTERM and e.value.exit_code == 143
  assert checkpoint.available(wd) == [0]     # saved, then stopped
  # The handlers are restored afterwards.
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.parametrize("moment,sig", [
    ("compile", signal.SIGINT),     # just after the benchmark is built
    ("training", signal.SIGTERM),   # within the first task's chunks
    ("checkpoint", signal.SIGINT),  # once task 1 is saved
])
def test_signal_to_a_real_run_exits_cleanly(tmp_path, moment, sig):
  wd = str(tmp_path / "w")
  args = QUICK + (["--config.chunk_size=5"] if moment == "training" else [])
  proc = start(*args, "--workdir", wd)
  if moment == "compile":
    line = proc.stdout.readline()          # printed before build + compile
    assert line.startswith("benchmark "), line
  elif moment == "training":
    csv = os.path.join(wd, "metrics.csv")
    wait_for(lambda: os.path.exists(csv) and os.path.getsize(csv) > 0,
             proc, "training")
  else:
    wait_for(lambda: checkpoint.available(wd), proc, "checkpoint 0")
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert_clean_stop(proc, sig, out, err)
  assert not os.path.exists(os.path.join(wd, "results.json"))
  if moment == "checkpoint":
    assert checkpoint.available(wd)[:1] == [0]


# -- integrity of what a resume reads --------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("fin") / "run")
  experiment.run(tiny_config(), wd, log=quiet, bench=toy_benchmark())
  return wd


def tamper(path, old, new):
  text = open(path).read()
  assert old in text
  open(path, "w").write(text.replace(old, new, 1))


@pytest.mark.parametrize("item", ["accuracy", "init_accuracy", "lca_curve",
                                  "runs", "config"])
def test_edited_checkpoint_metadata_is_refused_by_name(finished, tmp_path,
                                                       item):
  wd = shutil.copytree(finished, tmp_path / "w")
  ck = os.path.join(wd, "checkpoints", "2")    # the one a resume reads
  if item == "config":
    tamper(os.path.join(ck, "config", "metadata"), '"lr": 0.1',
           '"lr": 0.2')
  else:
    meta_file = os.path.join(ck, "meta", "metadata")
    meta = json.load(open(meta_file))
    if item == "runs":
      tamper(meta_file, '"seed": 0', '"seed": 1')
    else:
      value = np.ravel(np.asarray(meta[item], dtype=float))
      number = json.dumps(float(value[np.isfinite(value)][0]))
      digit = re.search(r"[1-8]", number[2:]).start() + 2
      changed = number[:digit] + str(int(number[digit]) + 1) + \
          number[digit + 1:]
      tamper(meta_file, number, changed)      # one digit of one number
  os.remove(os.path.join(wd, "results.json"))
  want = (rf"checkpoint {re.escape(ck)} is corrupt: its metadata or config "
          r"does not match the digest saved with them .*resume_from=1")
  with pytest.raises(checkpoint.CheckpointError, match=want):
    experiment.run(tiny_config(), str(wd), log=quiet, bench=toy_benchmark())
  with pytest.raises(checkpoint.CheckpointError, match=want):
    experiment.load(str(wd), bench=toy_benchmark())
  assert not os.path.exists(os.path.join(wd, "results.json"))


def test_digest_covers_the_state_fingerprint(finished):
  meta, cfg = checkpoint.read_meta(finished, 1)
  assert meta["digest"] == checkpoint.digest(meta, cfg)
  assert checkpoint.digest(dict(meta, fingerprint="0" * 64), cfg) != \
      meta["digest"]


def test_corrupt_array_metadata_is_one_error(finished, tmp_path):
  wd = str(shutil.copytree(finished, tmp_path / "w"))
  folder = os.path.join(wd, "checkpoints", "2", "state", "array_metadatas")
  for name in os.listdir(folder):
    open(os.path.join(folder, name), "w").write("{garbage")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/2 is corrupt.*array_metadatas"):
    experiment.load(wd, structured=False)


# -- memory, disk ----------------------------------------------------------------

def quick_config(**kw):
  from bcl_jax.config import load_config_file
  c = load_config_file(os.path.join(ROOT, "configs", "mnist.py:quick"))
  c.progress = c.heatmap = False
  for k, v in kw.items():
    c[k] = v
  return c


def no_data(config):
  raise AssertionError("the benchmark was loaded")


@pytest.mark.parametrize("field,value,knob", [
    ("chunk_size", 10**9, "reduce chunk_size"),
    ("eval_batch_size", 10**9, "reduce eval_batch_size"),
    ("n_epochs", 10**9, "reduce n_epochs"),
    ("n_memories", 10**7, "reduce n_memories"),
])
def test_memory_is_estimated_before_allocating(tmp_path, field, value, knob):
  wd = tmp_path / "w"
  messages = []
  with pytest.raises(guard.ResourceError, match=r"needs about [\d.]+ "
                     rf"(GiB|TiB)? ?.*more than the .*; {knob}"):
    experiment.run(quick_config(checkpoint=False, **{field: value}), str(wd),
                   log=messages.append)
  assert not any(m.startswith("task ") for m in messages)
  assert not wd.exists()          # created by the run, nothing written


def test_huge_task_count_is_refused_before_building(tmp_path, monkeypatch):
  monkeypatch.setattr(experiment, "load_data", no_data)
  # 1000 tasks of the 4000 + 1000 embedded digits as float32 (+ labels),
  # and the 1000 test sets stacked on host and device.
  need = (1000 * 5000 * (784 * 4 + 8) + 2 * 1000 * 1000 * (784 * 4 + 5))
  with pytest.raises(guard.ResourceError, match=rf"the benchmark needs about "
                     rf"{need / 2**30:.1f} GiB .*1000 tasks of data.*more "
                     r"than the 4.0 GiB allowed \(memory_limit_gb=4\); "
                     r"reduce n_tasks"):
    experiment.run(quick_config(n_tasks=1000, memory_limit_gb=4.0),
                   str(tmp_path / "w"), log=quiet)


def test_available_memory_reads_meminfo():
  with open("/proc/meminfo") as f:
    line = next(ln for ln in f if ln.startswith("MemAvailable:"))
  want = int(line.split()[1]) * 1024
  assert 0 < guard.available_memory() <= want * 1.2


def test_full_disk_without_checkpoints_is_refused_before_training(
    tmp_path, monkeypatch):
  wd = tmp_path / "w"
  wd.mkdir()
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: usage._replace(free=1 << 20))
  messages = []
  with pytest.raises(guard.ResourceError, match=r"has 1 MiB free; the "
                     r"results and logs need about"):
    experiment.run(tiny_config(checkpoint=False), str(wd),
                   log=messages.append, bench=toy_benchmark())
  assert not any(m.startswith("task ") for m in messages)


def test_late_write_failure_keeps_the_results(tmp_path, monkeypatch):
  def full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(results_lib, "write_all", full)
  with pytest.raises(results_lib.WorkdirError, match=r"could not write the "
                     r"results into .*No space left on device.*saved to "
                     r"(\S+\.json) instead") as e:
    experiment.run(tiny_config(checkpoint=False), str(tmp_path / "w"),
                   log=quiet, bench=toy_benchmark())
  path = re.search(r"saved to (\S+\.json) instead", str(e.value)).group(1)
  res = json.load(open(path))
  os.remove(path)
  assert np.asarray(res["accuracy_matrix"]).shape == (3, 3)


def test_rerun_of_a_finished_run_needs_no_disk(finished, tmp_path,
                                               monkeypatch):
  wd = str(shutil.copytree(finished, tmp_path / "w"))
  usage = shutil.disk_usage(wd)
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: usage._replace(free=4096))
  messages = []
  experiment.run(tiny_config(), wd, log=messages.append, bench=toy_benchmark())
  assert any("already learned" in m for m in messages)


# -- validation, leftovers ------------------------------------------------------

@pytest.mark.parametrize("field,value,want", [
    ("seed", -1, "seed must be a non-negative integer, got -1"),
    ("data_seed", -1, "data_seed must be a non-negative integer, got -1"),
    ("use", float("inf"), "use must be a finite number > 0"),
    ("use", float("nan"), "use must be a finite number > 0"),
    ("memory_limit_gb", -1.0, "memory_limit_gb must be >= 0"),
])
def test_bad_fields_are_named(field, value, want):
  with pytest.raises(ValueError, match=re.escape(want)):
    experiment.validate_config(tiny_config(**{field: value}))


def test_failed_run_removes_the_workdir_it_created(tmp_path):
  wd = tmp_path / "new"
  with pytest.raises(Exception, match="nope.pt"):
    experiment.run(tiny_config(data_file="nope.pt"), str(wd), log=quiet)
  assert not wd.exists()
  old = tmp_path / "old"
  old.mkdir()
  with pytest.raises(Exception, match="nope.pt"):
    experiment.run(tiny_config(data_file="nope.pt"), str(old), log=quiet)
  assert old.is_dir()           # not ours to remove


def test_memory_limit_is_a_non_result_field():
  assert "memory_limit_gb" in default_config()
  from bcl_jax import resume
  assert "memory_limit_gb" in resume.NON_RESULT_FIELDS
