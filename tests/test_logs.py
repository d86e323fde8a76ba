"""MetricLogger: metrics.csv, TensorBoard event files, optional W&B."""

import glob
import io
import os

import ml_collections
import numpy as np
import pytest

from bcl_jax import logs


def test_crc32c_known_vectors():
  # RFC 3720 (iSCSI) check value of "123456789", and the empty string.
  assert logs.crc32c(b"123456789") == 0xE3069283
  assert logs.crc32c(b"") == 0
  # 32 bytes of zeros (RFC 3720 B.4).
  assert logs.crc32c(bytes(32)) == 0x8A9136AA


def test_loss_series_round_trips_through_csv_and_event_files(tmp_path):
  wd = str(tmp_path / "run")
  loss = np.array([[1.0, 0.5, 0.25], [2.0, 1.5, 1.25]])  # [runs, steps]
  with logs.MetricLogger(wd) as log:
    log.scalars(0, {"loss": loss}, prefix="train")
    log.scalars(3, {"loss": np.array([0.125, 1.0])}, prefix="train")
    log.task_end(0, np.array([[0.9, 0.1], [0.8, 0.2]]),
                 {"train_seconds": 1.5, "per_task": [1, 2]})
    log.scalars(4, {"lr": 0.03}, prefix="train")

  rows = logs.read_csv(os.path.join(wd, "metrics.csv"))
  got = [(r["step"], r["run"], r["value"]) for r in rows
         if r["name"] == "train/loss"]
  assert got == [(0, 0, 1.0), (0, 1, 2.0), (1, 0, 0.5), (1, 1, 1.5),
                 (2, 0, 0.25), (2, 1, 1.25), (3, 0, 0.125), (3, 1, 1.0)]
  assert all(r["task"] == 0 for r in rows if r["name"] == "train/loss")
  ev = {(r["run"], r["name"]): r["value"] for r in rows
        if r["name"].startswith("eval/")}
  assert ev[(0, "eval/acc_task0")] == 0.9 and ev[(1, "eval/acc_task1")] == 0.2
  assert ev[(0, "eval/acc_seen")] == 0.9       # only task 0 seen
  assert ev[(1, "eval/acc_all")] == pytest.approx(0.5)
  timing = [r for r in rows if r["name"].startswith("time/")]
  assert [(r["name"], r["run"], r["value"]) for r in timing] == [
      ("time/train_seconds", None, 1.5)]       # lists are skipped
  # After task_end(0) the next values belong to task 1.
  assert [r["task"] for r in rows if r["name"] == "train/lr"] == [1]

  run1 = glob.glob(os.path.join(wd, "tb", "run1", "events.out.tfevents.*"))
  assert len(run1) == 1
  events = logs.read_events(run1[0])
  series = [(s, v) for s, tag, v in events if tag == "train/loss"]
  assert series == [(0, 2.0), (1, 1.5), (2, 1.25), (3, 1.0)]
  assert (3, "eval/acc_task1", pytest.approx(0.2)) in [
      (s, t, pytest.approx(v)) for s, t, v in events]
  program = glob.glob(os.path.join(wd, "tb", "all", "events.*"))
  assert [(s, t, v) for s, t, v in logs.read_events(program[0])] == [
      (3, "time/train_seconds", 1.5), (4, "train/lr", pytest.approx(0.03))]


def test_event_file_parses_with_tensorboard_protos(tmp_path):
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  with logs.MetricLogger(str(tmp_path)) as log:
    log.scalars(7, {"loss": np.array([0.5])}, prefix="train")
  path = glob.glob(str(tmp_path / "tb" / "run0" / "events.*"))[0]
  data = open(path, "rb").read()
  records, i = [], 0
  while i < len(data):
    n = int.from_bytes(data[i:i + 8], "little")
    records.append(data[i + 12:i + 12 + n])
    i += 16 + n
  first, second = (event_pb2.Event.FromString(r) for r in records)
  assert first.file_version == "brain.Event:2"
  assert second.step == 7 and second.wall_time > 0
  assert [(v.tag, v.simple_value) for v in second.summary.value] == [
      ("train/loss", 0.5)]


def test_corrupt_event_file_is_refused(tmp_path):
  with logs.MetricLogger(str(tmp_path)) as log:
    log.scalars(1, {"loss": np.array([0.5])})
  path = glob.glob(str(tmp_path / "tb" / "run0" / "events.*"))[0]
  data = bytearray(open(path, "rb").read())
  data[-6] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="checksum mismatch"):
    logs.read_events(path)


def test_disabled_logger_writes_nothing(tmp_path):
  log = logs.MetricLogger(str(tmp_path / "w"), enabled=False)
  log.scalars(0, {"loss": np.ones(2)})
  log.task_end(0, np.ones((2, 2)), {})
  log.close()
  assert not (tmp_path / "w").exists()


def test_resumed_logger_appends_without_a_second_header(tmp_path):
  for step in (0, 1):
    with logs.MetricLogger(str(tmp_path)) as log:
      log.scalars(step, {"loss": np.array([float(step)])})
  text = (tmp_path / "metrics.csv").read_text()
  assert text.count("step,task,run,name,value") == 1
  assert [r["step"] for r in logs.read_csv(str(tmp_path / "metrics.csv"))] \
      == [0, 1]


def test_bad_value_shape_is_named(tmp_path):
  with logs.MetricLogger(str(tmp_path)) as log:
    with pytest.raises(ValueError, match="train/x: a value must be"):
      log.scalars(0, {"x": np.ones((1, 2, 3))}, prefix="train")


class _Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self._tty = tty

  def isatty(self):
    return self._tty


def test_show_progress_only_on_a_terminal():
  c = ml_collections.ConfigDict({"progress": True})
  assert logs.show_progress(c, _Stream(True))
  assert not logs.show_progress(c, _Stream(False))
  c.progress = False
  assert not logs.show_progress(c, _Stream(True))


def test_wandb_offline(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  with logs.MetricLogger(str(tmp_path), wandb=True) as log:
    log.scalars(0, {"loss": np.array([0.5, 0.25])}, prefix="train")
    log.task_end(0, np.array([[0.9], [0.8]]), {"train_seconds": 1.0})
  assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


def test_wandb_missing_names_the_extra(tmp_path, monkeypatch):
  import builtins
  real = builtins.__import__

  def no_wandb(name, *a, **k):
    if name == "wandb":
      raise ImportError("no wandb")
    return real(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", no_wandb)
  with pytest.raises(ImportError, match=r"pip install 'bcl_jax\[wandb\]'"):
    logs.MetricLogger(str(tmp_path), wandb=True)
