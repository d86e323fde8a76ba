"""Writing a run's outputs into its workdir.

Files (README "Results format"):

* ``config.json``: the full config.
* ``results.json``: metrics, accuracy matrix, timing, versions, per-run
  entries.
* ``results.txt``: the reference-style text file (matrix, then metrics).
* ``accuracy.png``: heatmap of the (mean) accuracy matrix.

Every file is written to a temporary name and renamed into place, so a crash
or a bad run never leaves a half-written file over a good one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile

import numpy as np

from bcl_jax import metrics as metrics_lib

METRIC_KEYS = ("acc", "fm", "la", "bwt", "fwt")


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


def check_workdir(workdir: str) -> None:
  """Fails early, before any training, if ``workdir`` is not writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable ({e.strerror}); "
                       "pass --workdir with a folder you can write") from None


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes ``data`` atomically with normal permissions (see bcl_jax.fileio)."""
  from bcl_jax import fileio  # pylint: disable=import-outside-toplevel
  fileio.atomic_write(path, data)


def versions() -> dict[str, str]:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for pkg in ("bcl_jax", "jax", "jaxlib", "flax", "numpy", "orbax-checkpoint"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  try:
    import jax
    out["backend"] = jax.default_backend()
    out["devices"] = [str(d) for d in jax.devices()]
  except Exception:  # pragma: no cover - versions are best effort
    pass
  return out


def build_results(accuracy: np.ndarray, init_acc, runs, timing,
                  hp_names=()) -> dict:
  """The ``results.json`` payload from a ``[runs, T, T]`` accuracy array."""
  per_run = []
  for r, run in enumerate(runs):
    m = metrics_lib.all_metrics(
        accuracy[r], None if init_acc is None else init_acc[r])
    per_run.append({"seed": run.seed,
                    "hp": {k: run.hp[k] for k in (hp_names or run.hp)},
                    "metrics": m,
                    "accuracy_matrix": accuracy[r].tolist(),
                    "init_accuracy": (None if init_acc is None
                                      else init_acc[r].tolist())})
  keys = per_run[0]["metrics"].keys()
  mean = {k: float(np.mean([p["metrics"][k] for p in per_run])) for k in keys}
  std = {k: float(np.std([p["metrics"][k] for p in per_run])) for k in keys}
  return {
      "metrics": mean,
      "metrics_std": std,
      "accuracy_matrix": accuracy.mean(0).tolist(),
      "init_accuracy": None if init_acc is None else init_acc.mean(0).tolist(),
      "timing": timing,
      "runs": per_run,
      "versions": versions(),
  }


def summary_line(res: dict) -> str:
  """The one stdout line: ``ACC a FM f LA l`` (mean +- std over runs)."""
  m, s = res["metrics"], res["metrics_std"]
  if len(res["runs"]) == 1:
    return f"ACC {m['acc']:.4f} FM {m['fm']:.4f} LA {m['la']:.4f}"
  return " ".join(f"{k.upper()} {m[k]:.4f} ± {s[k]:.4f}"
                  for k in ("acc", "fm", "la"))


def reference_text(res: dict) -> str:
  """The reference's text file: the matrix, then one line per metric."""
  lines = [" ".join(f"{a:.4f}" for a in row) for row in res["accuracy_matrix"]]
  lines.append("")
  for k in METRIC_KEYS + (("fwt_gem",) if "fwt_gem" in res["metrics"] else ()):
    lines.append(f"{k.upper()}: {res['metrics'][k]:.4f}")
  lines.append("ACC FM LA: " + " ".join(
      f"{res['metrics'][k]:.4f}" for k in ("acc", "fm", "la")))
  return "\n".join(lines) + "\n"


def heatmap_png(matrix, title: str) -> bytes:
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(1 + 0.5 * m.shape[1], 1 + 0.45 * m.shape[0]))
  im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
  if m.shape[0] <= 20:
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                color="w" if m[i, j] < 0.6 else "k")
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return buf.getvalue()


def write_all(workdir: str, config_dict: dict, res: dict, title: str,
              heatmap: bool = True) -> None:
  atomic_write(os.path.join(workdir, "config.json"),
               json.dumps(config_dict, indent=2, sort_keys=True, default=str))
  atomic_write(os.path.join(workdir, "results.json"),
               json.dumps(res, indent=2, default=float))
  atomic_write(os.path.join(workdir, "results.txt"), reference_text(res))
  if heatmap:
    atomic_write(os.path.join(workdir, "accuracy.png"),
                 heatmap_png(res["accuracy_matrix"], title))
