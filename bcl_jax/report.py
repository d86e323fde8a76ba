"""From runs to a paper table: compare any number of workdirs.

    python -m bcl_jax.report results/ [more workdirs or folders] \
        [--out report/] [--plot]

Every folder holding ``results.json`` and ``config.json`` under the given
paths is read. Runs are grouped by benchmark x method x setting (a setting
is a run's hyper-parameters, ``hp`` in ``results.json``, plus the config
fields that change results): seeds of the same setting pool together even
when they ran in different workdirs, and a sweep's workdir gives one row
per setting. Each row shows mean ± sample std (``ddof=1``) over its runs of
ACC, FM, LA, BWT, FWT, LCA (when recorded) and the wall time, and ``n``.

``--out DIR`` writes ``table.md``, ``table.csv`` and ``table.tex``;
``--plot`` adds, per benchmark, the accuracy on the tasks seen so far after
each task and the final accuracy on each task (PNG and PDF).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys

import numpy as np

from bcl_jax import cli

from bcl_jax import metrics as metrics_lib
from bcl_jax import results as results_lib

METRICS = ("acc", "fm", "la", "bwt", "fwt", "lca")

# Config fields that do not define a setting: where and how a run was
# executed, its outputs, and the seeds (pooled into one row).
NOT_SETTING = frozenset({
    "seed", "num_seeds", "sweep", "run_batching", "data_path", "progress",
    "heatmap", "chunk_size", "eval_batch_size", "checkpoint", "keep",
    "resume_from", "force_resume", "wandb", "logs", "lca_batches", "method",
    # A run's resolved fields already hold what its presets gave it.
    "presets", "download", "data_url", "data_sha256", "data_md5",
    "compile_cache", "compile_preset", "memory_limit_gb",
})


class ReportError(ValueError):
  """A path holds no runs, or a results file cannot be read."""


@dataclasses.dataclass
class Row:
  """One line of the table: the runs of one benchmark x method x setting."""
  benchmark: str
  n_tasks: int
  method: str
  setting: dict            # every setting field -> value
  runs: list               # [{"seed", "metrics", "accuracy_matrix", "workdir"}]
  times: list              # wall seconds of each program that ran them
  label: str = ""          # the setting fields that vary between rows

  @property
  def n(self) -> int:
    return len(self.runs)

  def stat(self, key: str) -> tuple[float, float] | None:
    """Mean and sample std of metric ``key`` (or ``"time"``) over the runs."""
    if key == "time":
      vals = self.times
    else:
      vals = [r["metrics"][key] for r in self.runs if key in r["metrics"]]
      if len(vals) != len(self.runs):
        return None
    return metrics_lib.mean_std(vals) if vals else None

  def matrices(self) -> np.ndarray:
    return np.asarray([r["accuracy_matrix"] for r in self.runs], np.float64)


def find_workdirs(paths: list[str]) -> list[str]:
  """Each path that is a workdir, or the workdirs found below it."""
  found = []
  for p in paths:
    if not os.path.isdir(p):
      raise ReportError(f"{p} is not a folder; pass workdirs or folders "
                        "that contain them")
    here = []
    for root, dirs, files in os.walk(p):
      dirs[:] = sorted(d for d in dirs if not d.startswith("checkpoints")
                       and not d.startswith("."))
      if "results.json" in files and "config.json" in files:
        here.append(root)
        dirs[:] = []   # a workdir's subfolders are its own outputs
    if not here:
      raise ReportError(f"no run under {p}: a workdir holds results.json "
                        "and config.json (is the run finished?)")
    found += [h for h in here if h not in found]
  return found


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ReportError(f"cannot read {path}: {e}") from None


def _wall_seconds(timing: dict) -> float:
  if "total_seconds" in timing:
    return float(timing["total_seconds"])
  return float(timing.get("train_seconds", 0.0)
               + timing.get("compile_seconds", 0.0))


def _setting_value(v):
  """A config value as a hashable, comparable key."""
  if isinstance(v, dict):
    return tuple(sorted((k, _setting_value(x)) for k, x in v.items()))
  return tuple(_setting_value(x) for x in v) if isinstance(v, list) else v


def collect(paths: list[str], ignore=()) -> list[Row]:
  """The table's rows from workdirs (or folders holding workdirs).

  Args:
    paths: workdirs or parent folders (searched recursively).
    ignore: more config fields that do not define a setting.

  Raises:
    ReportError: a path without runs, or an unreadable results file.
  """
  skip = NOT_SETTING | set(ignore)
  groups: dict[tuple, Row] = {}
  for wd in find_workdirs(paths):
    res = _read_json(os.path.join(wd, "results.json"))
    cfg = _read_json(os.path.join(wd, "config.json"))
    if "runs" not in res or "metrics" not in res:
      raise ReportError(f"{wd}/results.json has no 'runs'/'metrics': not a "
                        "bcl_jax results file")
    bench = res.get("benchmark", {})
    name = bench.get("name") or cfg.get("benchmark", "?")
    n_tasks = int(bench.get("n_tasks") or len(res["accuracy_matrix"]))
    method = cfg.get("method", "?")
    wall = _wall_seconds(res.get("timing", {}))
    base = {k: _setting_value(v) for k, v in sorted(cfg.items())
            if k not in skip}
    used = set()
    for s in results_lib.group_settings(res["runs"]):
      hp = res["runs"][s["run_indices"][0]]["hp"]
      setting = dict(base, **{k: float(v) for k, v in hp.items()})
      key = (name, n_tasks, method, tuple(sorted(setting.items())))
      row = groups.setdefault(key, Row(name, n_tasks, method, setting, [],
                                       []))
      for i in s["run_indices"]:
        r = res["runs"][i]
        if any(o["seed"] == r["seed"] for o in row.runs):
          print(f"warning: seed {r['seed']} of {method} on {name} appears "
                f"more than once ({wd}); every copy is counted",
                file=sys.stderr)
        row.runs.append({"seed": r["seed"], "metrics": r["metrics"],
                         "accuracy_matrix": r["accuracy_matrix"],
                         "workdir": wd})
      if key not in used:    # one program time per workdir and row
        row.times.append(wall)
        used.add(key)
  rows = sorted(groups.values(),
                key=lambda r: (r.benchmark, r.n_tasks, r.method,
                               json.dumps(r.setting, default=str)))
  _label(rows)
  return rows


def _label(rows: list[Row]) -> None:
  """Names each row by the setting fields that vary within its method."""
  by: dict[tuple, list[Row]] = {}
  for r in rows:
    by.setdefault((r.benchmark, r.n_tasks, r.method), []).append(r)
  for same in by.values():
    keys = [k for k in same[0].setting
            if len({json.dumps(r.setting.get(k), default=str)
                    for r in same}) > 1]
    for r in same:
      r.label = " ".join(f"{k}={_fmt_value(r.setting.get(k))}" for k in keys)


def _fmt_value(v) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  if isinstance(v, tuple):
    return "/".join(map(str, v))
  return str(v)


def best_rows(rows: list[Row]) -> set[int]:
  """Indices of the rows with the highest mean ACC of their benchmark."""
  best: dict[tuple, int] = {}
  for i, r in enumerate(rows):
    k = (r.benchmark, r.n_tasks)
    if k not in best or r.stat("acc")[0] > rows[best[k]].stat("acc")[0]:
      best[k] = i
  return set(best.values())


def _columns(rows: list[Row]) -> list[str]:
  return [m for m in METRICS
          if any(r.stat(m) is not None for r in rows)] + ["time"]


def _cell(row: Row, key: str, digits: int, pm: str = " ± ") -> str:
  st = row.stat(key)
  if st is None:
    return "–"
  d = 1 if key == "time" else digits
  if row.n == 1 and key != "time" or len(row.times) == 1 and key == "time":
    return f"{st[0]:.{d}f}"
  return f"{st[0]:.{d}f}{pm}{st[1]:.{d}f}"


HEADER_NOTE = ("mean ± sample std (ddof=1) over the n runs of each row; "
               "time: wall seconds of the program that ran the runs "
               "(shared by every run of a vmapped program); * best ACC of "
               "its benchmark")


def _header(cols: list[str]) -> list[str]:
  return (["benchmark", "T", "method", "setting", "n"]
          + [("time (s)" if c == "time" else c.upper()) for c in cols])


def _cells(rows: list[Row], digits: int, pm: str = " ± ") -> list[list[str]]:
  cols, best = _columns(rows), best_rows(rows)
  return [[r.benchmark, str(r.n_tasks),
           r.method + ("*" if i in best else ""), r.label or "-", str(r.n)]
          + [_cell(r, c, digits, pm) for c in cols]
          for i, r in enumerate(rows)]


def text_table(rows: list[Row], digits: int = 4) -> str:
  """The terminal table, aligned, with the note on what ± means."""
  table = [_header(_columns(rows))] + _cells(rows, digits)
  widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
  lines = ["  ".join(v.ljust(w) if c < 4 else v.rjust(w)
                     for c, (v, w) in enumerate(zip(line, widths)))
           for line in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return HEADER_NOTE + "\n" + "\n".join(lines) + "\n"


def markdown(rows: list[Row], digits: int = 4) -> str:
  head = _header(_columns(rows))
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if c < 4 else "---:"
                          for c in range(len(head))) + "|"]
  lines += ["| " + " | ".join(cells) + " |"
            for cells in _cells(rows, digits)]
  return "\n".join(lines) + "\n\n" + HEADER_NOTE + ".\n"


def csv_text(rows: list[Row]) -> str:
  """Full-precision numbers, one row per table row, ``_mean``/``_std``."""
  cols = _columns(rows)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["benchmark", "n_tasks", "method", "setting", "n", "seeds"]
             + [f"{c}_{s}" for c in cols for s in ("mean", "std")]
             + ["std_ddof", "workdirs"])
  for r in rows:
    stats = []
    for c in cols:
      st = r.stat(c)
      stats += ["", ""] if st is None else [repr(st[0]), repr(st[1])]
    w.writerow([r.benchmark, r.n_tasks, r.method, r.label, r.n,
                " ".join(str(x["seed"]) for x in r.runs)] + stats
               + [metrics_lib.STD_DDOF,
                  " ".join(sorted({x["workdir"] for x in r.runs}))])
  return buf.getvalue()


def _tex(s: str) -> str:
  for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"),
               ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
    s = s.replace(a, b)
  return s


def latex(rows: list[Row], digits: int = 4) -> str:
  """A booktabs ``tabular``; the best ACC of each benchmark in bold."""
  cols, best = _columns(rows), best_rows(rows)
  head = [_tex(h) for h in _header(cols)]
  out = [f"% {HEADER_NOTE}",
         r"% needs \usepackage{booktabs}",
         r"\begin{tabular}{lrll r" + "c" * len(cols) + "}",
         r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
  prev = None
  for i, r in enumerate(rows):
    if prev is not None and (r.benchmark, r.n_tasks) != prev:
      out.append(r"\midrule")
    prev = (r.benchmark, r.n_tasks)
    vals = []
    for c in cols:
      cell = _cell(r, c, digits, pm=r" \pm ")
      cell = cell if cell == "–" else f"${cell}$"
      if c == "acc" and i in best:
        cell = r"$\mathbf{" + cell.strip("$") + "}$"
      vals.append("--" if cell == "–" else cell)
    out.append(" & ".join([_tex(r.benchmark), str(r.n_tasks), _tex(r.method),
                           _tex(r.label or "-"), str(r.n)] + vals) + r" \\")
  out += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(out) + "\n"


def write_tables(rows: list[Row], out: str, digits: int = 4) -> list[str]:
  """Writes ``table.md``, ``table.csv`` and ``table.tex`` into ``out``."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for name, text in (("table.md", markdown(rows, digits)),
                     ("table.csv", csv_text(rows)),
                     ("table.tex", latex(rows, digits))):
    paths.append(os.path.join(out, name))
    results_lib.atomic_write(paths[-1], text)
  return paths


# ------------------------------------------------------------------ plots --

def seen_accuracy(matrix) -> np.ndarray:
  """``c[i]`` = mean accuracy on tasks ``0..i`` after learning task ``i``."""
  m = np.asarray(matrix, np.float64)
  return np.array([m[i, :i + 1].mean() for i in range(m.shape[0])])


def _plot_rows(rows: list[Row]) -> list[Row]:
  """One row per method: its best setting by ACC when it has several."""
  best: dict[str, Row] = {}
  for r in rows:
    if r.method not in best or r.stat("acc")[0] > best[r.method].stat("acc")[0]:
      best[r.method] = r
  return [best[m] for m in sorted(best)]


def _legend_label(r: Row, several: bool) -> str:
  label = r.method + (f" ({r.label})" if several and r.label else "")
  return f"{label}, n={r.n}"


def _slug(s: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def plot(rows: list[Row], out: str, formats=("png", "pdf")) -> list[str]:
  """Per benchmark: accuracy on the tasks seen so far, final per-task
  accuracy. Files ``<benchmark>-T<T>-seen.<fmt>`` and ``...-final.<fmt>``.

  One line / bar group per method (its best setting by ACC if it has
  several); bands and error bars are ± the sample std over seeds.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out, exist_ok=True)
  methods = sorted({r.method for r in rows})
  colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
  paths = []
  by: dict[tuple, list[Row]] = {}
  for r in rows:
    by.setdefault((r.benchmark, r.n_tasks), []).append(r)
  style = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8,
           "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7}
  for (bench, t), group in sorted(by.items()):
    chosen = _plot_rows(group)
    several = {m: sum(r.method == m for r in group) > 1 for m in methods}
    base = os.path.join(out, f"{_slug(bench)}-T{t}")
    tasks = np.arange(1, t + 1)
    with plt.rc_context(style):
      fig, ax = plt.subplots(figsize=(3.6, 2.7), layout="constrained")
      for r in chosen:
        curves = np.stack([seen_accuracy(m) for m in r.matrices()])
        mean = curves.mean(0)
        ax.plot(tasks, mean, marker="o", ms=3, color=colour[r.method],
                label=_legend_label(r, several[r.method]))
        if r.n > 1:
          sd = curves.std(0, ddof=metrics_lib.STD_DDOF)
          ax.fill_between(tasks, mean - sd, mean + sd, alpha=0.2, lw=0,
                          color=colour[r.method])
      results_lib.task_ticks(ax, t, axis="x")
      ax.set_xlim(0.7, t + 0.3)
      ax.set_xlabel("tasks learned")
      ax.set_ylabel("mean accuracy on tasks seen")
      ax.set_title(f"{bench}: accuracy on the tasks seen so far")
      ax.grid(alpha=0.3, lw=0.5)
      ax.legend(title="± sample std over seeds", title_fontsize=6.5,
                frameon=False)
      paths += _save(fig, base + "-seen", formats)

      fig, ax = plt.subplots(figsize=(max(3.6, 0.25 * t * len(chosen) + 1.2),
                                      2.7), layout="constrained")
      width = 0.8 / len(chosen)
      for k, r in enumerate(chosen):
        final = r.matrices()[:, -1, :]
        sd = (final.std(0, ddof=metrics_lib.STD_DDOF) if r.n > 1
              else None)
        ax.bar(tasks + (k - (len(chosen) - 1) / 2) * width, final.mean(0),
               width=width, yerr=sd, capsize=1.5, color=colour[r.method],
               error_kw={"lw": 0.6}, label=_legend_label(r,
                                                         several[r.method]))
      results_lib.task_ticks(ax, t, axis="x")
      ax.set_xlim(0.4, t + 0.6)
      ax.set_ylim(0, 1.0)
      ax.set_xlabel("task")
      ax.set_ylabel("final test accuracy")
      ax.set_title(f"{bench}: accuracy on each task after task {t}")
      ax.grid(axis="y", alpha=0.3, lw=0.5)
      ax.legend(title="± sample std over seeds", title_fontsize=6.5,
                frameon=False, ncols=min(len(chosen), 3),
                loc="upper center", bbox_to_anchor=(0.5, -0.25))
      paths += _save(fig, base + "-final", formats)
  return paths


def _save(fig, base: str, formats) -> list[str]:
  import matplotlib.pyplot as plt
  paths = []
  try:
    for fmt in formats:
      paths.append(f"{base}.{fmt}")
      results_lib.atomic_write(paths[-1], results_lib.figure_bytes(fig, fmt))
  finally:
    plt.close(fig)
  return paths


# -------------------------------------------------------------------- CLI --

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog=cli.prog_name("bcl-report", "bcl_jax.report"),
      description="Compare runs: one row per benchmark x method x setting, "
      "mean ± sample std (ddof=1) over seeds.")
  parser.add_argument("paths", nargs="+", metavar="DIR",
                      help="workdirs, or folders searched for them")
  parser.add_argument("--out", default=None,
                      help="write table.md, table.csv, table.tex (and the "
                      "figures) into this folder")
  parser.add_argument("--plot", action="store_true",
                      help="draw the figures (PNG and PDF) into --out")
  parser.add_argument("--digits", type=int, default=4,
                      help="decimals in the printed tables (default 4)")
  parser.add_argument("--ignore", action="append", default=[],
                      metavar="FIELD", help="a config field that does not "
                      "define a setting (repeatable)")
  args = parser.parse_args(argv)
  if args.plot and not args.out:
    print("error: --plot writes files; add --out DIR", file=sys.stderr)
    return 2
  try:
    rows = collect(args.paths, ignore=args.ignore)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(text_table(rows, args.digits), end="")
  if args.out:
    written = write_tables(rows, args.out, args.digits)
    if args.plot:
      written += plot(rows, args.out)
    print(f"wrote {len(written)} files to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
