"""Where a compiled step's time goes on XLA:CPU: a per-category table from a
``jax.profiler`` trace (issue 11's "where the remaining time goes").

XLA:CPU's runtime executes a program as thunks, and the profiler records
one event per executed thunk on the thread that ran it (``ynn_fusion.12``,
``pad_slice_fusion.3``, ``concatenate.7``, ...). :func:`breakdown` sorts
those events into categories (library convolutions and matmuls, im2col
taps, patch concatenations, their gradients' pads, reductions, other
fused kernels, copies) and sums their durations per observe step. Library
fusions (YNNPACK/XNNPACK/oneDNN) are named only by number, so the optimised
HLO text (``jax.stages.Compiled.as_text()``) tells which are convolutions
and which are matmuls (:func:`library_roots`).

The sums are *thread time of the issuing thread*: a library matmul that
hands work to a second thread counts once (its helper tasks carry no
event), and ops that ran at the same time on two threads both count. So
the total can differ from the step's wall time in either direction; the
shares say where the issuing threads spend their time.

    import jax
    from bcl_jax import xla_profile
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
        run_the_step()
    events = xla_profile.trace_events(tmp)
    rows = xla_profile.breakdown(events, xla_profile.library_roots(
        compiled.as_text()), steps=50)
    print(xla_profile.table(rows, wall_ms=...))
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re

# Events that are not an op's own work: executor bookkeeping, control flow
# (whose bodies' thunks are recorded on their own), thread-pool markers.
_NOT_OPS = re.compile(r"^(ThunkExecutor|end: |ThreadpoolListener|"
                      r"SlinkyThreadPool|while|cond|conditional|call)\b")

# The categories, in the table's order:
CATEGORIES = (
    "library convolution",  # a library fusion (YNNPACK/XNNPACK/oneDNN)
                            # rooted in a convolution, or a convolution thunk
    "library matmul",       # the same for dots (the im2col convs' matmuls)
    "im2col taps",          # pad + slice kernels building the patches
    "patch concatenation",  # concatenations (the taps stacked on channels)
    "tap gradients",        # slice + pad kernels (the taps' gradients)
    "reductions",           # kernels rooted in a reduce (BatchNorm's sums)
    "other fused kernels",  # elementwise and select fusions (BatchNorm's
                            # transform, ReLU, masks, SGD, memory writes)
    "copies",               # copy thunks
)


def trace_events(directory: str) -> list[dict]:
  """The complete ('X') events of XLA's runtime threads (``tf_XLA...``)
  in the newest perfetto trace under ``directory`` (written by
  ``jax.profiler.trace(directory, create_perfetto_trace=True)``); the
  Python thread's events (``$train.py:...``) are left out."""
  paths = sorted(glob.glob(os.path.join(
      directory, "plugins", "profile", "*", "perfetto_trace.json.gz")))
  if not paths:
    raise FileNotFoundError(
        f"no perfetto_trace.json.gz under {directory}/plugins/profile/; "
        "trace with jax.profiler.trace(dir, create_perfetto_trace=True)")
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
             for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return [e for e in events if e.get("ph") == "X" and threads.get(
      (e.get("pid"), e.get("tid")), "").startswith("tf_XLA")]


def library_roots(hlo_text: str) -> dict[str, str]:
  """``{fusion instruction name: root opcode}`` for the fusions of an
  optimised HLO module's text (e.g. ``{"ynn_fusion.3": "convolution"}``)."""
  roots = {}
  comp_root = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^\s*%?([\w.\-]+) \(.*\) -> .*\{\s*$", line)
    if head:
      current = head.group(1)
      continue
    if current is not None:
      m = re.match(r"^\s*ROOT %?[\w.\-]+ = \S+ ([\w\-]+)\(", line)
      if m:
        comp_root[current] = m.group(1)
      if line.startswith("}"):
        current = None
  for m in re.finditer(r"%?([\w.\-]+) = \S+ fusion\([^\n]*?calls=%?([\w.\-]+)",
                       hlo_text):
    if m.group(2) in comp_root:
      roots[m.group(1)] = comp_root[m.group(2)]
  return roots


def category(name: str, roots: dict[str, str]) -> str | None:
  """The :data:`CATEGORIES` entry of one thunk event's name (None: not an
  op's own work)."""
  if _NOT_OPS.match(name):
    return None
  root = roots.get(name)
  base = re.sub(r"[._]\d+$", "", name)
  if root == "convolution" or base == "convolution":
    return "library convolution"
  if root == "dot" or base in ("dot", "dot_general"):
    return "library matmul"
  if root == "reduce" or "reduce" in base:
    return "reductions"
  if base == "copy":
    return "copies"
  if base.startswith("pad_slice"):
    return "im2col taps"
  if "concatenate" in base:
    return "patch concatenation"
  if base.startswith("slice_pad"):
    return "tap gradients"
  return "other fused kernels"


def breakdown(events, roots: dict[str, str], steps: int) -> list[dict]:
  """Per category: ``ms`` (thread time per step), ``calls`` (per step) and
  ``share`` (of the categorised total), in :data:`CATEGORIES` order."""
  ms = dict.fromkeys(CATEGORIES, 0.0)
  calls = dict.fromkeys(CATEGORIES, 0)
  for e in events:
    c = category(e.get("name", ""), roots)
    if c is None:
      continue
    ms[c] += float(e.get("dur", 0.0)) / 1000.0   # trace durations are in us
    calls[c] += 1
  total = sum(ms.values()) or 1.0
  return [{"category": c, "ms": ms[c] / steps, "calls": calls[c] / steps,
           "share": ms[c] / total} for c in CATEGORIES]


def table(rows: list[dict], wall_ms: float | None = None) -> str:
  """A markdown table of :func:`breakdown`'s rows."""
  out = ["| category | ms / step (thread time) | calls / step | share |",
         "|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['category']} | {r['ms']:.1f} | {r['calls']:.0f} | "
               f"{100 * r['share']:.0f}% |")
  total = sum(r["ms"] for r in rows)
  out.append(f"| total | {total:.1f} | {sum(r['calls'] for r in rows):.0f} "
             f"| 100% |")
  if wall_ms is not None:
    out.append(f"(the step's wall time: {wall_ms:.1f} ms; thread time counts "
               "each op once on the thread that ran it: a library matmul's "
               "helper thread is not counted, ops on two threads at once "
               "both are)")
  return "\n".join(out)
