"""bcl_jax.xla_profile: the per-category table of a profiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax import xla_profile as xp

HLO = """HloModule jit_step

%fused_computation.1 (param_0: f32[8,4,4,2], param_1: f32[3,3,2,2]) -> f32[8,4,4,2] {
  %param_0 = f32[8,4,4,2]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,2,2]{3,2,1,0} parameter(1)
  ROOT %convolution.3 = f32[8,4,4,2]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (param_0.1: f32[16,18], param_1.1: f32[18,2]) -> f32[16,2] {
  %param_0.1 = f32[16,18]{1,0} parameter(0)
  %param_1.1 = f32[18,2]{1,0} parameter(1)
  ROOT %dot.4 = f32[16,2]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.3 (param_0.2: f32[16,2]) -> f32[2] {
  %param_0.2 = f32[16,2]{1,0} parameter(0)
  %constant = f32[] constant(0)
  ROOT %reduce.1 = f32[2]{0} reduce(%param_0.2, %constant), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[8,4,4,2], k: f32[3,3,2,2], p: f32[16,18], w: f32[18,2]) -> f32[2] {
  %ynn_fusion.7 = f32[8,4,4,2]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%fused_computation.1, backend_config={}
  %ynn_fusion.9 = f32[16,2]{1,0} fusion(%p, %w), kind=kCustom, calls=%fused_computation.2
  ROOT %ynn_fusion.11 = f32[2]{0} fusion(%ynn_fusion.9), kind=kCustom, calls=%fused_computation.3
}
"""


def test_library_roots_reads_each_fusions_root_opcode():
  assert xp.library_roots(HLO) == {"ynn_fusion.7": "convolution",
                                   "ynn_fusion.9": "dot",
                                   "ynn_fusion.11": "reduce"}


@pytest.mark.parametrize("name,expected", [
    ("ynn_fusion.7", "library convolution"),
    ("ynn_fusion.9", "library matmul"),
    ("ynn_fusion.11", "reductions"),
    ("dot.12", "library matmul"),
    ("convolution.2", "library convolution"),
    ("pad_slice_fusion.40", "im2col taps"),
    ("concatenate.3", "patch concatenation"),
    ("bitcast_concatenate_fusion", "patch concatenation"),
    ("slice_pad_fusion.2", "tap gradients"),
    ("wrapped_reduce.1", "reductions"),
    ("copy.9", "copies"),
    ("add_select_fusion.55", "other fused kernels"),
    ("ThunkExecutor::Execute", None),
    ("end: ynn_fusion.7", None),
    ("while.3", None),
    ("cond", None),
    ("ThreadpoolListener::StartRegion", None),
    ("SlinkyThreadPool::Await", None),
])
def test_category_of_event_names(name, expected):
  roots = xp.library_roots(HLO)
  assert xp.category(name, roots) == expected


def test_breakdown_sums_thread_time_per_step_and_skips_bookkeeping():
  roots = xp.library_roots(HLO)
  events = [
      {"name": "ynn_fusion.7", "dur": 3000.0},      # 3 ms, convolution
      {"name": "ynn_fusion.7", "dur": 1000.0},
      {"name": "ynn_fusion.9", "dur": 2000.0},      # matmul
      {"name": "pad_slice_fusion.1", "dur": 500.0},
      {"name": "add_select_fusion", "dur": 1500.0},
      {"name": "ThunkExecutor::Execute", "dur": 99000.0},  # not an op
      {"name": "while.1", "dur": 99000.0},
  ]
  rows = {r["category"]: r for r in xp.breakdown(events, roots, steps=2)}
  assert [r["category"] for r in xp.breakdown(events, roots, 2)] == list(
      xp.CATEGORIES)
  assert rows["library convolution"]["ms"] == pytest.approx(2.0)
  assert rows["library convolution"]["calls"] == pytest.approx(1.0)
  assert rows["library matmul"]["ms"] == pytest.approx(1.0)
  assert rows["im2col taps"]["ms"] == pytest.approx(0.25)
  assert rows["other fused kernels"]["ms"] == pytest.approx(0.75)
  assert rows["copies"]["ms"] == 0.0
  total = 4.0  # ms per step over the categorised events
  assert rows["library convolution"]["share"] == pytest.approx(2.0 / total)
  assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
  text = xp.table(list(rows.values()), wall_ms=5.0)
  assert "| library convolution | 2.0 | 1 | 50% |" in text
  assert "| total | 4.0 |" in text
  assert "wall time: 5.0 ms" in text


def test_trace_events_without_a_trace_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
    xp.trace_events(str(tmp_path))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU names")
def test_a_real_trace_of_a_matmul_lands_in_the_matmul_category(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b))
  a = jnp.asarray(np.random.default_rng(0).random((256, 128), np.float32))
  b = jnp.asarray(np.random.default_rng(1).random((128, 64), np.float32))
  compiled = f.lower(a, b).compile()
  compiled(a, b).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      compiled(a, b).block_until_ready()
  events = xp.trace_events(str(tmp_path))
  assert events and all(not e["name"].startswith("$") for e in events)
  rows = {r["category"]: r for r in xp.breakdown(
      events, xp.library_roots(compiled.as_text()), steps=3)}
  assert rows["library matmul"]["calls"] == pytest.approx(1.0)
  assert rows["library matmul"]["ms"] > 0
