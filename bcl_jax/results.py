"""Writing a run's outputs into its workdir.

Files (README "Results format"):

* ``config.json``: the full config.
* ``results.json``: metrics, accuracy matrix, timing, versions, per-run
  entries.
* ``results.txt``: the reference-style text file (matrix, then metrics).
* ``accuracy.png`` and ``accuracy.pdf``: heatmap of the mean accuracy matrix,
  one panel per hyper-parameter setting.

Spreads over seeds are sample standard deviations (``ddof=1``; 0 for a
single run).

Every file is written to a temporary name and renamed into place, so a crash
or a bad run never leaves a half-written file over a good one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import threading

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


def _hp_key(hp: dict) -> tuple:
  return tuple(sorted((k, float(v)) for k, v in hp.items()))


def swept_names(runs: list[dict]) -> list[str]:
  """The hyper-parameters whose value differs between runs, in hp order."""
  if not runs:
    return []
  names = list(runs[0]["hp"])
  return [k for k in names
          if len({float(r["hp"].get(k, float("nan"))) for r in runs}) > 1]


def setting_label(hp: dict) -> str:
  """``lr=0.01 beta=0.3``: how a setting is named in every output."""
  return " ".join(f"{k}={v:g}" for k, v in hp.items()) or "all runs"


def group_settings(runs: list[dict]) -> list[dict]:
  """The runs of one results.json grouped by setting (their ``hp`` values).

  Returns one entry per setting, in run order: ``hp`` (the swept fields
  only), ``label``, ``n``, ``seeds``, ``run_indices``, ``metrics`` and
  ``metrics_std`` (mean and sample std, ddof=1, over the setting's seeds; std
  0 for one seed) and ``accuracy_matrix`` (the mean over its seeds).
  """
  names = swept_names(runs)
  order: dict[tuple, list[int]] = {}
  for i, run in enumerate(runs):
    order.setdefault(_hp_key(run["hp"]), []).append(i)
  out = []
  for idx in order.values():
    members = [runs[i] for i in idx]
    hp = {k: float(members[0]["hp"][k]) for k in names}
    keys = members[0]["metrics"].keys()
    stats = {k: metrics_lib.mean_std([m["metrics"][k] for m in members])
             for k in keys}
    out.append({
        "hp": hp, "label": setting_label(hp), "n": len(members),
        "seeds": [m["seed"] for m in members], "run_indices": idx,
        "metrics": {k: v[0] for k, v in stats.items()},
        "metrics_std": {k: v[1] for k, v in stats.items()},
        "accuracy_matrix": np.mean([m["accuracy_matrix"] for m in members],
                                   axis=0).tolist()})
  return out


def best_setting(settings: list[dict]) -> int:
  """Index of the setting with the highest mean ACC (the first on ties)."""
  return int(np.argmax([s["metrics"]["acc"] for s in settings]))


def build_results(accuracy: np.ndarray, init_acc, runs, timing,
                  hp_names=(), lca_curve=None) -> dict:
  """The ``results.json`` payload from a ``[runs, T, T]`` accuracy array.

  ``metrics``/``metrics_std``/``accuracy_matrix`` pool every run (kept for
  one-setting readers); ``settings`` has one entry per hyper-parameter
  setting (see ``group_settings``) and, with several, ``best_setting`` the
  index of the best by ACC. Stds are sample stds (``std_ddof`` = 1).
  """
  per_run = []
  for r, run in enumerate(runs):
    m = metrics_lib.all_metrics(
        accuracy[r], None if init_acc is None else init_acc[r])
    if lca_curve is not None:
      m["lca"] = metrics_lib.lca(lca_curve[r])
    per_run.append({"seed": run.seed,
                    "hp": {k: run.hp[k] for k in (hp_names or run.hp)},
                    "metrics": m,
                    "accuracy_matrix": accuracy[r].tolist(),
                    "init_accuracy": (None if init_acc is None
                                      else init_acc[r].tolist()),
                    "lca_curve": (None if lca_curve is None else
                                  metrics_lib.nan_to_none(lca_curve[r]))})
  keys = per_run[0]["metrics"].keys()
  stats = {k: metrics_lib.mean_std([p["metrics"][k] for p in per_run])
           for k in keys}
  settings = group_settings(per_run)
  out = {
      "metrics": {k: v[0] for k, v in stats.items()},
      "metrics_std": {k: v[1] for k, v in stats.items()},
      "std_ddof": metrics_lib.STD_DDOF,
      "accuracy_matrix": accuracy.mean(0).tolist(),
      "init_accuracy": None if init_acc is None else init_acc.mean(0).tolist(),
      "timing": timing,
      "runs": per_run,
      "settings": settings,
      "versions": versions(),
  }
  if len(settings) > 1:
    out["best_setting"] = best_setting(settings)
  return out


def _settings_of(res: dict) -> list[dict]:
  # results.json files written before ``settings`` existed.
  return res.get("settings") or group_settings(res["runs"])


def _metric_text(m: dict, s: dict, n: int) -> str:
  if n == 1:
    return f"ACC {m['acc']:.4f} FM {m['fm']:.4f} LA {m['la']:.4f}"
  return " ".join(f"{k.upper()} {m[k]:.4f} ± {s[k]:.4f}"
                  for k in ("acc", "fm", "la"))


def summary_line(res: dict) -> str:
  """What a run prints last.

  One run: ``ACC a FM f LA l``. Several seeds of one setting: ``ACC m ± s
  FM m ± s LA m ± s`` (mean ± sample std, ddof=1). Several settings: one
  line per setting (``lr=0.01 beta=0.3: ACC ... (n=3)``), then the best by
  ACC; the pool of all runs is not a result and is not printed.
  """
  settings = _settings_of(res)
  if len(settings) == 1:
    return _metric_text(res["metrics"], res["metrics_std"], len(res["runs"]))
  width = max(len(s["label"]) for s in settings)
  lines = [f"{s['label'] + ':':<{width + 1}} "
           f"{_metric_text(s['metrics'], s['metrics_std'], s['n'])} "
           f"(n={s['n']})" for s in settings]
  best = settings[best_setting(settings)]
  lines.append(f"best by ACC: {best['label']}")
  return "\n".join(lines)


def _matrix_block(matrix, m: dict, s: dict | None) -> list[str]:
  lines = [" ".join(f"{a:.4f}" for a in row) for row in matrix]
  lines.append("")
  for k in METRIC_KEYS + (("fwt_gem",) if "fwt_gem" in m else ()):
    lines.append(f"{k.upper()}: {m[k]:.4f}"
                 + ("" if s is None else f" ± {s[k]:.4f}"))
  lines.append("ACC FM LA: " + " ".join(f"{m[k]:.4f}"
                                        for k in ("acc", "fm", "la")))
  return lines


def reference_text(res: dict) -> str:
  """The reference's text file: the matrix, then one line per metric.

  With several settings, one such block per setting (its mean matrix and
  metrics, ± the sample std over its seeds), then the best by ACC.
  """
  settings = _settings_of(res)
  if len(settings) == 1:
    return "\n".join(_matrix_block(res["accuracy_matrix"], res["metrics"],
                                   None)) + "\n"
  lines = []
  for s in settings:
    lines.append(f"# setting {s['label']}: {s['n']} seed(s) "
                 f"{' '.join(map(str, s['seeds']))}; mean ± sample std "
                 "(ddof=1) over seeds")
    lines += _matrix_block(s["accuracy_matrix"], s["metrics"],
                           s["metrics_std"])
    lines.append("")
  lines.append(f"best by ACC: {settings[best_setting(settings)]['label']}")
  return "\n".join(lines) + "\n"


# Cell values are printed up to this many tasks; past it they are unreadable.
MAX_LABELLED_TASKS = 15


def clean_title(title: str) -> str:
  """``title`` with every absolute path cut to its last component."""
  return re.sub(r"(?<![\w.])/(?:[^\s/()]+/)*([^\s/()]+)", r"\1", title)


def task_ticks(ax, n_tasks: int, axis: str = "both") -> None:
  """Integer, 1-based task ticks on ``ax`` (every task up to 20, else fewer).

  The data must be drawn at x (and/or y) = 1..T.
  """
  from matplotlib import ticker
  for which in ("x", "y") if axis == "both" else (axis,):
    a = ax.xaxis if which == "x" else ax.yaxis
    if n_tasks <= 20:
      a.set_major_locator(ticker.FixedLocator(range(1, n_tasks + 1)))
    else:
      a.set_major_locator(ticker.MaxNLocator(nbins=10, integer=True,
                                             steps=[1, 2, 5, 10]))
    a.set_major_formatter(ticker.FormatStrFormatter("%d"))


def _colour_range(matrices) -> tuple[float, float]:
  """The data's range, widened to multiples of 0.05 (at least 0.05 wide)."""
  lo = float(min(np.min(m) for m in matrices))
  hi = float(max(np.max(m) for m in matrices))
  lo, hi = np.floor(lo * 20) / 20, np.ceil(hi * 20) / 20
  if hi - lo < 0.05:
    lo, hi = max(0.0, hi - 0.05), max(hi, 0.05)
  return float(lo), float(hi)


def prefetch_plotting() -> None:
  """Imports matplotlib (Agg) and loads its font in a daemon thread.

  The end-of-run heatmap then does not wait for them (about 2 s of a 15 s
  permuted-MNIST run): meanwhile the training loop mostly waits on compiled
  code, which leaves the interpreter free. Failures are left to the
  heatmap itself to report.
  """
  def warm():
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot  # noqa: F401
      from matplotlib import font_manager
      font_manager.findfont(font_manager.FontProperties())
    except Exception:  # pylint: disable=broad-except
      pass
  threading.Thread(target=warm, name="bcl-jax-plot-warmup",
                   daemon=True).start()


def heatmap_figure(panels: list[tuple[np.ndarray, str]], title: str):
  """A figure with one accuracy-matrix heatmap per ``(matrix, caption)``.

  Tasks are numbered from 1 (as the console's ``task k/T``); one colour
  scale, fitted to the data, is shared by every panel.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mats = [np.asarray(m, dtype=np.float64) for m, _ in panels]
  t = mats[0].shape[1]
  ncols = int(np.ceil(np.sqrt(len(mats))))
  nrows = int(np.ceil(len(mats) / ncols))
  # About 0.42 in per labelled cell; past that a panel stays ~5 in wide.
  cell = 0.42 if t <= MAX_LABELLED_TASKS else max(0.1, 4.5 / t)
  side = max(2.8, cell * t + 1.0)
  fig, axes = plt.subplots(
      nrows, ncols, squeeze=False, layout="constrained",
      figsize=(ncols * side + 1.2, nrows * (side + 0.4) + 0.4))
  lo, hi = _colour_range(mats)
  norm = matplotlib.colors.Normalize(lo, hi)
  cmap = plt.get_cmap("viridis")
  for ax, m, (_, caption) in zip(axes.flat, mats, panels):
    im = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest",
                   extent=(0.5, t + 0.5, m.shape[0] + 0.5, 0.5))
    if t <= MAX_LABELLED_TASKS:
      size = 7 if t <= 10 else 5.5
      for i in range(m.shape[0]):
        for j in range(t):
          r, g, b, _ = cmap(norm(m[i, j]))
          dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
          ax.text(j + 1, i + 1, f"{m[i, j]:.2f}", ha="center", va="center",
                  fontsize=size, color="white" if dark else "black")
    task_ticks(ax, t)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(caption, fontsize=7.5)
  for ax in list(axes.flat)[len(mats):]:
    ax.set_visible(False)
  bar = fig.colorbar(im, ax=axes, shrink=0.8 if nrows == 1 else 0.6)
  bar.set_label("test accuracy")
  fig.suptitle(clean_title(title), fontsize=9)
  return fig


def figure_bytes(fig, fmt: str) -> bytes:
  """``fig`` as PNG (150 dpi) or a vector format (``pdf``, ``svg``).

  The figures lay themselves out (``layout="constrained"``), so no
  ``bbox_inches="tight"``: it draws each figure twice (0.05 s a format).
  """
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format=fmt, dpi=150)
  return buf.getvalue()


def _caption_metrics(m: dict, s: dict, n: int) -> str:
  if n == 1:
    return f"ACC {m['acc']:.3f}  FM {m['fm']:.3f}  LA {m['la']:.3f}"
  return "  ".join(f"{k.upper()} {m[k]:.3f}±{s[k]:.3f}"
                   for k in ("acc", "fm", "la"))


def heatmap_panels(res: dict) -> list[tuple[np.ndarray, str]]:
  """One panel per setting: its mean matrix, its metrics as the caption."""
  settings = _settings_of(res)
  if len(settings) == 1:
    n = len(res["runs"])
    caption = _caption_metrics(res["metrics"], res["metrics_std"], n)
    if n > 1:
      caption = f"mean of {n} seeds (± sample std)\n{caption}"
    return [(np.asarray(res["accuracy_matrix"]), caption)]
  best = best_setting(settings)
  return [(np.asarray(s["accuracy_matrix"]),
           f"{s['label']}{' (best ACC)' if i == best else ''}, n={s['n']}\n"
           + _caption_metrics(s["metrics"], s["metrics_std"], s["n"]))
          for i, s in enumerate(settings)]


def write_heatmap(workdir: str, res: dict, title: str,
                  formats=("png", "pdf")) -> list[str]:
  """Writes ``workdir/accuracy.<fmt>`` for each format; returns the paths."""
  import matplotlib.pyplot as plt
  fig = heatmap_figure(heatmap_panels(res), title)
  paths = []
  try:
    for fmt in formats:
      path = os.path.join(workdir, f"accuracy.{fmt}")
      atomic_write(path, figure_bytes(fig, fmt))
      paths.append(path)
  finally:
    plt.close(fig)
  return paths


def write_all(workdir: str, config_dict: dict, res: dict, title: str,
              heatmap: bool = True) -> None:
  atomic_write(os.path.join(workdir, "config.json"),
               json.dumps(config_dict, indent=2, sort_keys=True, default=str))
  atomic_write(os.path.join(workdir, "results.json"),
               json.dumps(res, indent=2, default=float))
  atomic_write(os.path.join(workdir, "results.txt"), reference_text(res))
  if heatmap:
    write_heatmap(workdir, res, title)
