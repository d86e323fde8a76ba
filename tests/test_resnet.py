"""ResNet-18s: shapes, parameter counts, PyTorch BatchNorm, inputs, weights."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcl_jax.models import build_model, resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA optimisations cost more compile time than these tiny runs save."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def reduced():
  model = build_model("resnet18_reduced", (3072,), 100)
  variables = jax.jit(model.init)(jax.random.key(0))
  return model, variables, jax.jit(model.apply, static_argnums=2)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# --- expected sizes, written from the architecture, not from the module ----


def _resnet18_counts(stem_kernel: int, widths, n_outputs: int):
  """(#params, #batch-stat values) of a ResNet-18 with BasicBlocks."""
  conv = lambda k, cin, cout: k * k * cin * cout  # no bias
  bn = lambda c: 2 * c  # scale + bias (and, for stats, mean + var)
  params = conv(stem_kernel, 3, widths[0]) + bn(widths[0])
  stats = bn(widths[0])
  cin = widths[0]
  for stage, width in enumerate(widths):
    for block in range(2):
      stride = 2 if (stage > 0 and block == 0) else 1
      params += conv(3, cin, width) + bn(width) + conv(3, width, width)
      params += bn(width)
      stats += 2 * bn(width)
      if stride != 1 or cin != width:
        params += conv(1, cin, width) + bn(width)
        stats += bn(width)
      cin = width
  params += cin * n_outputs + n_outputs
  return params, stats


def test_reduced_parameter_count():
  params, stats = _resnet18_counts(3, (20, 40, 80, 160), 100)
  assert params == 1_109_240  # the hand-computed number, stated in the report
  model = build_model("resnet18_reduced", (3072,), 100)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert _count(shapes["params"]) == params
  assert _count(shapes["batch_stats"]) == stats


def test_full_parameter_count_matches_torchvision():
  params, _ = _resnet18_counts(7, (64, 128, 256, 512), 1000)
  assert params == 11_689_512  # torchvision's resnet18, 1000 classes
  model = build_model("resnet18", (3, 224, 224), 1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert _count(shapes["params"]) == params


def test_reduced_init_matches_pytorch_bounds(reduced):
  _, variables, _ = reduced
  p = variables["params"]
  k = p["layer4"]["0"]["conv2"]["kernel"]  # fan_in 3*3*160
  bound = 1 / np.sqrt(9 * 160)
  assert k.shape == (3, 3, 160, 160)
  assert float(jnp.max(jnp.abs(k))) <= bound
  assert float(jnp.max(jnp.abs(k))) > 0.95 * bound  # uniform: reaches it
  b = p["linear"]["bias"]
  assert float(jnp.max(jnp.abs(b))) <= 1 / np.sqrt(160)
  assert float(jnp.max(jnp.abs(b))) > 0  # not zero-initialised
  assert "shortcut" in p["layer2"]["0"] and "shortcut" not in p["layer2"]["1"]
  assert "shortcut" not in p["layer1"]["0"]  # 20 -> 20, stride 1


# --- forward -----------------------------------------------------------------


def test_reduced_forward_shapes(reduced):
  _, variables, apply = reduced
  for x in (jnp.zeros((3, 3072)), jnp.zeros((2, 3, 84, 84))):
    for train in (False, True):
      logits, _ = apply(variables, x, train)
      assert logits.shape == (x.shape[0], 100)
      assert bool(jnp.all(jnp.isfinite(logits)))


def test_full_forward_shape():
  model = build_model("resnet18", (3, 224, 224), 7)
  variables = jax.jit(model.init)(jax.random.key(1))
  x = jax.random.uniform(jax.random.key(2), (1, 3, 224, 224))
  logits, out = jax.jit(model.apply, static_argnums=2)(variables, x, False)
  assert logits.shape == (1, 7)
  for a, b in zip(jax.tree_util.tree_leaves(out),
                  jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_uint8_float_and_flat_inputs_agree(reduced):
  _, variables, apply = reduced
  pixels = np.random.default_rng(0).integers(0, 256, (2, 3072), np.uint8)
  as_float = pixels.astype(np.float32) / 255.0
  as_image = as_float.reshape(2, 3, 32, 32)  # CIFAR rows: R plane, G, B
  l_uint8, _ = apply(variables, jnp.asarray(pixels), False)
  l_float, _ = apply(variables, jnp.asarray(as_float), False)
  l_image, _ = apply(variables, jnp.asarray(as_image), False)
  np.testing.assert_allclose(l_uint8, l_float, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l_image, l_float, rtol=1e-5, atol=1e-6)


def test_images_to_nhwc_channel_order():
  flat = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 48)
  out = np.asarray(resnet.images_to_nhwc(jnp.asarray(flat)))
  assert out.shape == (2, 4, 4, 3)
  assert out[1, 0, 0, 0] == flat[1, 0]  # first red pixel
  assert out[1, 0, 0, 1] == flat[1, 16]  # first green pixel
  assert out[1, 2, 3, 2] == flat[1, 32 + 2 * 4 + 3]
  with pytest.raises(ValueError, match="3\\*H\\*H"):
    resnet.images_to_nhwc(jnp.zeros((1, 100)))
  with pytest.raises(ValueError, match="N, 3, H, W"):
    resnet.images_to_nhwc(jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("kernel,stride,padding,side", [
    (3, 1, 1, 8), (3, 2, 1, 8), (3, 2, 1, 9), (1, 2, 0, 8), (1, 2, 0, 7),
    (7, 2, 3, 12), (7, 2, 3, 11)])
@pytest.mark.parametrize("impl,dk_blocks", [
    ("conv2d_xla", "off"), ("conv2d_xla", "one"), ("conv2d_xla", "scan"),
    ("conv2d_im2col", "")])
def test_conv2d_gradients_match_jax_rules(kernel, stride, padding, side,
                                          impl, dk_blocks, monkeypatch):
  """Both implementations (the canonical-layout VJP, im2col + matmul) equal
  XLA's convolution with JAX's own transpose rules, to first and second
  order. The XLA path's kernel gradient three ways (on CPU): one XLA
  convolution ("off"), one block of patches ("one"), and a scan over two
  blocks of two images plus a remainder image ("scan")."""
  conv = getattr(resnet, impl)
  out_side = (side + 2 * padding - kernel) // stride + 1
  rows = {"off": 0, "one": 4096, "scan": 2 * out_side ** 2, "": 4096}[dk_blocks]
  monkeypatch.setattr(resnet, "DK_BLOCK_ROWS", rows)
  rng = np.random.default_rng(kernel * 100 + side)
  x = jnp.asarray(rng.normal(size=(5, side, side, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)), jnp.float32)
  ours, vjp = jax.vjp(lambda x, k: conv(x, k, stride, padding), x, k)
  ref, ref_vjp = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  dy = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  for a, b in zip(vjp(dy), ref_vjp(dy)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Second order (meta_gradient="unrolled" differentiates through grads).
  def gnorm(conv):
    return lambda k: jnp.sum(jax.grad(lambda k: jnp.sum(conv(x, k) ** 2))(k)
                             ** 2)
  ours2 = jax.grad(gnorm(lambda x, k: conv(x, k, stride, padding)))(k)
  ref2 = jax.grad(gnorm(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))))(k)
  np.testing.assert_allclose(ours2, ref2, rtol=1e-3, atol=1e-2)


def test_conv2d_picks_implementation(monkeypatch):
  """``CONV_IMPL`` chooses the implementation; a bad value is one clear
  error."""
  x = jnp.ones((1, 4, 4, 2))
  k = jnp.ones((3, 3, 2, 1))
  monkeypatch.setattr(resnet, "CONV_IMPL", "im2col")
  jaxpr = str(jax.make_jaxpr(lambda x, k: resnet.conv2d(x, k, 1, 1))(x, k))
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
  monkeypatch.setattr(resnet, "CONV_IMPL", "conv")
  jaxpr = str(jax.make_jaxpr(lambda x, k: resnet.conv2d(x, k, 1, 1))(x, k))
  assert "conv_general_dilated" in jaxpr
  monkeypatch.setattr(resnet, "CONV_IMPL", "winograd")
  with pytest.raises(ValueError, match="unknown conv implementation "
                     "'winograd'"):
    resnet.conv2d(x, k, 1, 1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_auto_runs_large_stride1_3x3_as_xla_conv(monkeypatch):
  """``"auto"`` on CPU: im2col, except a stride-1 3x3 conv with >= 8 input
  channels over >= XLA_CONV_MIN_PIXELS output pixels (where im2col's 9x
  patches fall off a cache cliff), >= XLA_CONV_MIN_PIXELS_NARROW below 32
  input channels; 0 turns the exception off."""
  monkeypatch.setattr(resnet, "CONV_IMPL", "auto")
  monkeypatch.setattr(resnet, "XLA_CONV_MIN_PIXELS", 4 * 8 * 8)
  monkeypatch.setattr(resnet, "XLA_CONV_MIN_PIXELS_NARROW", 2 * 8 * 8)
  k3 = jnp.ones((3, 3, 8, 4))
  k32 = jnp.ones((3, 3, 32, 4))

  def uses_conv(shape, kernel, stride):
    x = jnp.ones(shape)
    return "conv_general_dilated" in str(jax.make_jaxpr(
        lambda x, k: resnet.conv2d(x, k, stride, 1))(x, kernel))

  assert uses_conv((2, 8, 8, 8), k3, 1)          # 8 channels, 128 pixels
  assert not uses_conv((1, 8, 8, 8), k3, 1)      # 64 pixels: im2col
  assert uses_conv((4, 8, 8, 32), k32, 1)        # 32 channels, 256 pixels
  assert not uses_conv((3, 8, 8, 32), k32, 1)    # 192 pixels: im2col
  assert not uses_conv((8, 8, 8, 8), k3, 2)      # strided: im2col
  assert not uses_conv((4, 8, 8, 3), jnp.ones((3, 3, 3, 4)), 1)  # 3 channels
  monkeypatch.setattr(resnet, "XLA_CONV_MIN_PIXELS", 0)
  monkeypatch.setattr(resnet, "XLA_CONV_MIN_PIXELS_NARROW", 0)
  assert not uses_conv((64, 8, 8, 8), k3, 1)
  assert not uses_conv((64, 8, 8, 32), k32, 1)
  # Either way the same convolution (forward and gradient), to rounding.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 8))
  kr = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 4))
  f = lambda impl: jax.value_and_grad(  # noqa: E731
      lambda x, k: jnp.sum(jnp.sin(impl(x, k, 1, 1))), (0, 1))(x, kr)
  (a, ga), (b, gb) = f(resnet.conv2d_xla), f(resnet.conv2d_im2col)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for u, v in zip(ga, gb):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


# --- BatchNorm ---------------------------------------------------------------


def test_batchnorm_training_matches_pytorch_formula():
  rng = np.random.default_rng(1)
  x = rng.normal(1.5, 2.0, (3, 2, 2, 4)).astype(np.float32)  # n = 12
  bn = resnet.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)
  assert set(variables["batch_stats"]) == {"mean", "var"}
  scale = rng.normal(size=4).astype(np.float32)
  bias = rng.normal(size=4).astype(np.float32)
  start_mean = rng.normal(size=4).astype(np.float32)
  start_var = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": start_mean, "var": start_var}}
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])

  flat = x.reshape(-1, 4).astype(np.float64)
  mu, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  want_y = (x - mu) / np.sqrt(biased + 1e-5) * scale + bias
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.9 * start_mean + 0.1 * mu,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 * start_var + 0.1 * unbiased,
                             rtol=1e-5, atol=1e-6)
  # The unbiased estimate is what lands in `var` (n / (n - 1) = 12 / 11).
  assert not np.allclose(stats["var"], 0.9 * start_var + 0.1 * biased)


def test_batchnorm_inference_uses_running_stats():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  stats = {"mean": rng.normal(size=5).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, 5).astype(np.float32)}
  params = {"scale": rng.normal(size=5).astype(np.float32),
            "bias": rng.normal(size=5).astype(np.float32)}
  bn = resnet.BatchNorm()
  y, updates = bn.apply({"params": params, "batch_stats": stats}, x,
                        train=False, mutable=["batch_stats"])
  want = ((x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
          + params["bias"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for k in stats:
    np.testing.assert_array_equal(updates["batch_stats"][k], stats[k])


def test_batchnorm_rejects_single_value_per_channel():
  bn = resnet.BatchNorm()
  variables = bn.init(jax.random.key(0), jnp.ones((1, 1, 1, 2)), train=False)
  with pytest.raises(ValueError, match="more than one value"):
    bn.apply(variables, jnp.ones((1, 1, 1, 2)), train=True,
             mutable=["batch_stats"])


def test_batchnorm_mask_uses_only_real_rows():
  rng = np.random.default_rng(7)
  real = rng.normal(0.5, 1.5, (3, 2, 2, 4)).astype(np.float32)  # n = 12
  padded = np.concatenate([real[:2], np.full((2, 2, 2, 4), 50.0, np.float32),
                           real[2:], np.full((1, 2, 2, 4), -9.0, np.float32)])
  mask = np.array([True, True, False, False, True, False])
  bn = resnet.BatchNorm()
  start = {"mean": rng.normal(size=4).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, 4).astype(np.float32)}
  variables = {"params": {"scale": rng.normal(size=4).astype(np.float32),
                          "bias": rng.normal(size=4).astype(np.float32)},
               "batch_stats": start}
  y, upd = bn.apply(variables, padded, train=True, mask=mask,
                    mutable=["batch_stats"])
  y_ref, upd_ref = bn.apply(variables, real, train=True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(y[mask], y_ref, rtol=1e-4, atol=1e-5)
  flat = real.reshape(-1, 4).astype(np.float64)
  want_mean = 0.9 * start["mean"] + 0.1 * flat.mean(0)
  want_var = 0.9 * start["var"] + 0.1 * flat.var(0, ddof=1)  # 12 / 11
  for got in (upd["batch_stats"], upd_ref["batch_stats"]):
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-6)
  # An all-True mask is the unmasked layer.
  y_all, upd_all = bn.apply(variables, real, train=True,
                            mask=np.ones(3, bool), mutable=["batch_stats"])
  np.testing.assert_allclose(y_all, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd_all["batch_stats"]["var"], want_var,
                             rtol=1e-5, atol=1e-6)


def test_batchnorm_all_padding_keeps_stats_and_stays_finite():
  bn = resnet.BatchNorm()
  x = jnp.full((4, 1, 1, 3), 2.0)
  variables = bn.init(jax.random.key(0), x, train=False)
  stats = {"mean": jnp.array([0.5, -1.0, 2.0]),
           "var": jnp.array([1.5, 0.5, 3.0])}
  variables = {"params": variables["params"], "batch_stats": stats}

  def f(params):
    y, upd = bn.apply({"params": params, "batch_stats": stats}, x,
                      train=True, mask=jnp.zeros(4, bool),
                      mutable=["batch_stats"])
    return jnp.sum(y), upd["batch_stats"]

  (total, new), grads = jax.value_and_grad(f, has_aux=True)(
      variables["params"])
  assert np.isfinite(float(total))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  for k in stats:
    np.testing.assert_array_equal(new[k], stats[k])


def test_reduced_model_mask_matches_unpadded_batch(reduced):
  model, variables, _ = reduced
  rng = np.random.default_rng(8)
  real = rng.integers(0, 256, (3, 3072), np.uint8)
  junk = np.full((3, 3072), 255, np.uint8)
  padded = np.concatenate([real[:1], junk[:2], real[1:], junk[2:]])
  mask = np.array([True, False, False, True, True, False])
  apply = jax.jit(model.apply, static_argnums=2)
  logits_ref, ref = apply(variables, jnp.asarray(real), True)
  logits, got = apply(variables, jnp.asarray(padded), True, jnp.asarray(mask))
  np.testing.assert_allclose(logits[mask], logits_ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(got["batch_stats"]),
                  jax.tree_util.tree_leaves(ref["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Without the mask the padding rows would move the statistics.
  _, unmasked = apply(variables, jnp.asarray(padded), True)
  assert not np.allclose(unmasked["batch_stats"]["bn1"]["mean"],
                         ref["batch_stats"]["bn1"]["mean"], atol=1e-4)


def test_apply_many_all_padding_batch_keeps_stats(reduced):
  from bcl_jax.methods import steps
  model, variables, _ = reduced
  x = jax.random.uniform(jax.random.key(9), (4, 3072))
  (_, _), new = steps.apply_many(model, variables, [x, x], True,
                                masks=[jnp.ones(4, bool), jnp.zeros(4, bool)])
  _, once = model.apply(variables, x, True, jnp.ones(4, bool))
  for a, b in zip(jax.tree_util.tree_leaves(new["batch_stats"]),
                  jax.tree_util.tree_leaves(once["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_apply_many_skips_an_all_padding_batch_exactly(reduced):
  """An all-padding batch is not computed (``lax.cond``): its logits are
  zeros, and the loss and gradients of batch + padding batch equal those of
  the batch alone bit for bit (what running it used to add was exact
  zeros). A partly real batch is computed."""
  from bcl_jax.methods import losses, steps
  model, variables, _ = reduced
  x = jax.random.uniform(jax.random.key(10), (4, 3072))
  y = jnp.array([0, 1, 2, 3])
  cols = jnp.zeros(100, bool).at[:5].set(True)

  def loss(params, second_mask):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    masks = [jnp.ones(4, bool)] + ([] if second_mask is None
                                   else [second_mask])
    outs, new = steps.apply_many(model, v, [x] * len(masks), True, masks,
                                 skippable=(False, True))
    total = sum(losses.masked_ce(o, y, cols, m) for o, m in zip(outs, masks))
    return total, (outs, new["batch_stats"])

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (alone, (_, stats_alone)), g_alone = grad(variables["params"], None)
  (both, (outs, stats_both)), g_both = grad(variables["params"],
                                            jnp.zeros(4, bool))
  assert float(alone) == float(both)
  np.testing.assert_array_equal(outs[1], np.zeros((4, 100), np.float32))
  for a, b in zip(jax.tree_util.tree_leaves(g_alone) +
                  jax.tree_util.tree_leaves(stats_alone),
                  jax.tree_util.tree_leaves(g_both) +
                  jax.tree_util.tree_leaves(stats_both)):
    np.testing.assert_array_equal(a, b)
  jaxpr = str(jax.make_jaxpr(loss)(variables["params"], jnp.zeros(4, bool)))
  assert "cond[" in jaxpr
  # One real row: computed, and its statistics move.
  (_, (outs, stats_one)), _ = grad(variables["params"],
                                   jnp.zeros(4, bool).at[0].set(True))
  assert np.any(np.asarray(outs[1]) != 0)
  assert not np.array_equal(stats_one["bn1"]["mean"], stats_alone["bn1"]["mean"])


def test_model_train_updates_stats_eval_leaves_them(reduced):
  _, variables, apply = reduced
  x = jax.random.uniform(jax.random.key(3), (4, 3072))
  _, after_eval = apply(variables, x, False)
  for a, b in zip(jax.tree_util.tree_leaves(after_eval),
                  jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  _, after_train = apply(variables, x, True)
  for a, b in zip(jax.tree_util.tree_leaves(after_train["params"]),
                  jax.tree_util.tree_leaves(variables["params"])):
    np.testing.assert_array_equal(a, b)
  # The stem BN sees the preprocessed input's conv; check its stat moved.
  stem = after_train["batch_stats"]["bn1"]
  assert not np.allclose(stem["mean"], 0.0)
  assert not np.allclose(stem["var"], 1.0)
  last = after_train["batch_stats"]["layer4"]["1"]["bn2"]
  assert not np.allclose(last["var"], 1.0)


def test_running_stats_carry_no_gradient(reduced):
  model, variables, _ = reduced
  x = jax.random.uniform(jax.random.key(4), (2, 3072))

  def mean_of_new_stats(params):
    _, new = model.apply({"params": params,
                          "batch_stats": variables["batch_stats"]}, x, True)
    return sum(jnp.sum(v)
               for v in jax.tree_util.tree_leaves(new["batch_stats"]))

  grads = jax.jit(jax.grad(mean_of_new_stats))(variables["params"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0
             for g in jax.tree_util.tree_leaves(grads))


# --- pretrained weights ------------------------------------------------------


def _torchvision_resnet18_shapes(n_classes: int = 1000) -> dict[str, tuple]:
  """torchvision resnet18 state-dict keys and shapes, from its definition."""
  shapes = {}

  def bn(prefix, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{leaf}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  shapes["conv1.weight"] = (64, 3, 7, 7)
  bn("bn1", 64)
  cin = 64
  for i, width in enumerate((64, 128, 256, 512)):
    for j in range(2):
      p = f"layer{i + 1}.{j}"
      shapes[f"{p}.conv1.weight"] = (width, cin, 3, 3)
      bn(f"{p}.bn1", width)
      shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
      bn(f"{p}.bn2", width)
      if j == 0 and i > 0:
        shapes[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
        bn(f"{p}.downsample.1", width)
      cin = width
  shapes["fc.weight"] = (n_classes, 512)
  shapes["fc.bias"] = (n_classes,)
  return shapes


@pytest.fixture(scope="module")
def full_shapes():
  model = build_model("resnet18", (3, 224, 224), 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  rng = np.random.default_rng(5)
  # Random stand-in variables: loading only needs the right shapes.
  return jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _random_state_dict(seed: int = 6) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: (rng.normal(size=s).astype(np.float32) if s else np.int64(7))
          for k, s in _torchvision_resnet18_shapes().items()}


def test_torchvision_names_are_one_to_one(full_shapes):
  names = resnet.torchvision_names(full_shapes)
  tv = {k for k in _torchvision_resnet18_shapes()
        if not k.endswith("num_batches_tracked")}
  assert set(names) == tv
  assert names["layer2.0.downsample.1.running_var"] == (
      "batch_stats", ("layer2", "0", "downsample", "1", "var"))
  assert names["layer3.1.bn2.weight"] == (
      "params", ("layer3", "1", "bn2", "scale"))


def test_load_pretrained_round_trip(full_shapes, tmp_path):
  sd = _random_state_dict()
  path = str(tmp_path / "r18.npz")
  np.savez(path, **sd)
  out = resnet.load_pretrained_npz(full_shapes, path)
  p, s = out["params"], out["batch_stats"]
  np.testing.assert_array_equal(
      p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  # One element by hand: torch W[o, i, h, w] -> flax K[h, w, i, o].
  assert p["layer2"]["0"]["conv1"]["kernel"][2, 1, 37, 101] == (
      sd["layer2.0.conv1.weight"][101, 37, 2, 1])
  np.testing.assert_array_equal(
      p["layer4"]["0"]["downsample"]["0"]["kernel"][0, 0],
      sd["layer4.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(p["layer1"]["1"]["bn2"]["scale"],
                                sd["layer1.1.bn2.weight"])
  np.testing.assert_array_equal(s["layer3"]["0"]["downsample"]["1"]["var"],
                                sd["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(s["bn1"]["mean"], sd["bn1.running_mean"])
  # fc keeps the model's own (fresh, n_outputs = 10) layer.
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(p["fc"][leaf], full_shapes["params"]["fc"][leaf])
  # The input was not modified.
  assert not np.array_equal(full_shapes["params"]["conv1"]["kernel"],
                            p["conv1"]["kernel"])


def test_load_pretrained_errors(full_shapes, tmp_path):
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(ValueError, match="nope.npz.*does not exist"):
    resnet.load_pretrained_npz(full_shapes, missing)

  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="cannot read.*junk.npz"):
    resnet.load_pretrained_npz(full_shapes, str(junk))

  sd = _random_state_dict()
  del sd["layer3.1.bn1.running_var"]
  path = str(tmp_path / "missing_key.npz")
  np.savez(path, **sd)
  with pytest.raises(ValueError,
                     match="missing_key.npz.*lack 1 key.*layer3.1.bn1.running_var"):
    resnet.load_pretrained_npz(full_shapes, path)

  sd = _random_state_dict()
  sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 3, 3), np.float32)
  path = str(tmp_path / "extra_key.npz")
  np.savez(path, **sd)
  with pytest.raises(ValueError,
                     match="extra_key.npz.*unexpected key.*layer5.0.conv1.weight"):
    resnet.load_pretrained_npz(full_shapes, path)

  sd = _random_state_dict()
  sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  path = str(tmp_path / "bad_shape.npz")
  np.savez(path, **sd)
  with pytest.raises(ValueError, match=r"bad_shape.npz.*layer1\.0\.conv2\.weight"
                     r".*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
    resnet.load_pretrained_npz(full_shapes, path)

  sd = _random_state_dict()  # a different classifier is fine: fc is skipped
  sd["fc.weight"] = np.zeros((5, 512), np.float32)
  path = str(tmp_path / "other_fc.npz")
  np.savez(path, **sd)
  resnet.load_pretrained_npz(full_shapes, path)


def test_convert_script_without_torch(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "convert_torchvision_resnet18",
      os.path.join(REPO, "scripts", "convert_torchvision_resnet18.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)  # must not import torch at module level
  arrays = script.state_dict_to_arrays(_random_state_dict())
  assert not any(k.endswith("num_batches_tracked") for k in arrays)
  assert all(a.dtype == np.float32 for a in arrays.values())
  assert script.main(["convert"]) == 2  # usage, before any torch import


def test_pretrained_through_init_state(tmp_path):
  """``train.init_state`` builds the state under jit(vmap(init)): the
  loader sees tracers and must only use their shapes."""
  from bcl_jax import train
  from bcl_jax.config import default_config
  from bcl_jax.data.benchmark import Task, make_benchmark
  shapes = _torchvision_resnet18_shapes()
  # One constant per key (its index): tiny compressed, yet every key differs.
  sd = {k: np.full(s, i, np.float32) for i, (k, s) in
        enumerate(sorted(shapes.items())) if s}
  path = str(tmp_path / "r18.npz")
  np.savez_compressed(path, **sd)
  rng = np.random.default_rng(10)
  tasks = [Task(rng.integers(0, 256, (4, 3, 16, 16), np.uint8),
                np.array([2 * t, 2 * t + 1] * 2),
                rng.integers(0, 256, (2, 3, 16, 16), np.uint8),
                np.array([2 * t, 2 * t + 1])) for t in range(2)]
  bench = make_benchmark("tiny", tasks, task_incremental=True)
  config = default_config()
  config.model, config.pretrained, config.num_seeds = "resnet18", path, 2
  config.n_memories = 10
  state = train.init_state(train.build(config, bench))
  v = state.variables
  index = {k: i for i, k in enumerate(sorted(shapes))}
  for run in range(2):
    np.testing.assert_array_equal(
        v["params"]["layer2"]["0"]["downsample"]["0"]["kernel"][run],
        index["layer2.0.downsample.0.weight"])
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"][run],
                                  index["bn1.running_var"])
    np.testing.assert_array_equal(v["params"]["layer4"]["1"]["bn2"]["bias"][run],
                                  index["layer4.1.bn2.bias"])
  fc = np.asarray(v["params"]["fc"]["kernel"])
  assert fc.shape == (2, 512, 4)
  assert not np.allclose(fc[0], fc[1])  # fresh, seeded per run
  assert not np.allclose(fc[0], index["fc.weight"])


def test_masked_padding_rows_stay_finite_with_one_real_row():
  """Full ResNet-18 at 32x32: layer4 is 1x1, so one real row has zero
  variance there; the padding rows must not blow up into inf/NaN."""
  model = build_model("resnet18", (3, 32, 32), 10)
  variables = jax.jit(model.init)(jax.random.key(11))
  x = jax.random.uniform(jax.random.key(12), (4, 3, 32, 32))
  mask = jnp.array([True, False, False, False])

  def loss(params):
    logits, new = model.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              x, True, mask)
    return jnp.sum(jnp.where(mask[:, None], logits, 0.0)), (logits, new)

  (value, (logits, new)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(logits)))
  for leaf in jax.tree_util.tree_leaves((grads, new)):
    assert np.all(np.isfinite(np.asarray(leaf)))


def _pool_loop(x, dy, window=3, stride=2, padding=1):
  """torch.nn.MaxPool2d and its gradient, by loops (float64): each window's
  first maximum in row-major order takes the cotangent."""
  n, h, w, c = x.shape
  ho = (h + 2 * padding - window) // stride + 1
  wo = (w + 2 * padding - window) // stride + 1
  y = np.full((n, ho, wo, c), -np.inf)
  dx = np.zeros(x.shape)
  for b in range(n):
    for ch in range(c):
      for oi in range(ho):
        for oj in range(wo):
          best = None
          for i in range(window):
            for j in range(window):
              r, q = oi * stride + i - padding, oj * stride + j - padding
              if 0 <= r < h and 0 <= q < w and (
                  best is None or x[b, r, q, ch] > x[b, best[0], best[1], ch]):
                best = (r, q)
          y[b, oi, oj, ch] = x[b, best[0], best[1], ch]
          dx[b, best[0], best[1], ch] += dy[b, oi, oj, ch]
  return y, dx


@pytest.mark.parametrize("shape", [(2, 7, 6, 3), (1, 8, 8, 2), (2, 6, 10, 3)])
def test_max_pool_first_maximum_like_pytorch(shape):
  rng = np.random.default_rng(0)
  # ReLU-like input: many ties at 0 and a few repeated positive values.
  x = np.maximum(rng.integers(-3, 3, shape), 0).astype(np.float32)
  dy = rng.standard_normal((shape[0], (shape[1] - 1) // 2 + 1,
                            (shape[2] - 1) // 2 + 1, shape[3]))
  y_want, dx_want = _pool_loop(x, dy)
  y, vjp = jax.vjp(lambda v: resnet.max_pool(v, 3, 2, 1), jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(dy, jnp.float32))
  np.testing.assert_array_equal(np.asarray(y), y_want)
  np.testing.assert_allclose(np.asarray(dx), dx_want, rtol=1e-6, atol=1e-6)


def test_max_pool_matches_flax_values_and_gradients():
  import flax.linen as nn
  x = jnp.maximum(jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 5)), 0)
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 5))

  def flax_pool(v):
    return nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  np.testing.assert_array_equal(resnet.max_pool(x, 3, 2, 1), flax_pool(x))
  ours = jax.grad(lambda v: jnp.sum(resnet.max_pool(v, 3, 2, 1) * w))(x)
  theirs = jax.grad(lambda v: jnp.sum(flax_pool(v) * w))(x)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  assert np.array_equal(np.asarray(ours) != 0, np.asarray(theirs) != 0)


def _plain_batch_norm(x, scale, bias, real, count, eps=1e-5):
  """BatchNorm's training transform written out for autodiff (the form the
  hand-written backward of ``resnet.batch_norm_train`` replaces)."""
  axes = tuple(range(x.ndim - 1))
  xs = x if real is None else jnp.where(real, x, 0.0)
  mean = jnp.sum(xs, axis=axes) / count
  sq = jnp.square(x - mean)
  var = jnp.sum(sq if real is None else jnp.where(real, sq, 0.0),
                axis=axes) / count
  y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
  return (y if real is None else jnp.where(real, y, 0.0)), mean, var


@pytest.mark.parametrize("masked", [False, True])
def test_batchnorm_backward_matches_autodiff(masked):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(0.7, 1.8, (6, 3, 3, 5)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=5), jnp.float32)
  bias = jnp.asarray(rng.normal(size=5), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  wm, wv = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(2))
  if masked:
    rows = np.array([True, False, True, True, False, True])
    real = jnp.asarray(rows).reshape(-1, 1, 1, 1)
    count = jnp.float32(rows.sum() * 9)
  else:
    real, count = None, jnp.float32(x.shape[0] * 9)

  def loss(bn):
    # Every output carries a cotangent, the mean and variance too.
    def f(x, scale, bias):
      y, mean, var = bn(x, scale, bias, real, count)
      return jnp.sum(y * w) + jnp.sum(mean * wm) + jnp.sum(var * wv)
    return f

  got = jax.value_and_grad(
      loss(lambda *a: resnet.batch_norm_train(*a, 1e-5)), (0, 1, 2))(
          x, scale, bias)
  want = jax.value_and_grad(loss(_plain_batch_norm), (0, 1, 2))(
      x, scale, bias)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, h in zip(got[1], want[1]):
    np.testing.assert_allclose(g, h, rtol=2e-4, atol=2e-5)
  if masked:  # padding rows get no gradient and give no statistics
    np.testing.assert_array_equal(np.asarray(got[1][0])[~rows], 0.0)


def test_batchnorm_groups_equal_separate_layers_with_gradients():
  """A [G, N] mask: each group normalised with its own statistics, as a
  layer applied to that group alone; the running averages take group 0,
  then group 1; an empty group leaves them alone; rows in no group are
  zeros with zero gradient. Checked against separate masked applications
  (values, running statistics, and gradients of a weighted sum)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(0.3, 2.0, (7, 2, 3, 4)), jnp.float32)
  a = np.array([1, 1, 0, 0, 1, 0, 0], bool)
  b = np.array([0, 0, 1, 1, 0, 0, 0], bool)
  bn = resnet.BatchNorm()
  variables = {"params": {"scale": rng.normal(size=4).astype(np.float32),
                          "bias": rng.normal(size=4).astype(np.float32)},
               "batch_stats": {"mean": rng.normal(size=4).astype(np.float32),
                               "var": rng.uniform(.5, 2, 4).astype(np.float32)}}
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def grouped(params, groups):
    y, upd = bn.apply({"params": params, "batch_stats":
                       variables["batch_stats"]}, x, train=True,
                      mask=jnp.asarray(groups), mutable=["batch_stats"])
    return jnp.sum(y * w), (y, upd["batch_stats"])

  def separate(params, groups):
    stats, y, total = variables["batch_stats"], jnp.zeros_like(x), 0.0
    for g in groups:
      yg, upd = bn.apply({"params": params, "batch_stats": stats}, x,
                         train=True, mask=jnp.asarray(g),
                         mutable=["batch_stats"])
      stats = upd["batch_stats"] if g.any() else stats
      y = y + yg
      total = total + jnp.sum(yg * w)
    return total, (y, stats)

  for groups in (np.stack([a, b]), np.stack([b, a]),
                 np.stack([a, np.zeros(7, bool)])):
    (t1, (y1, s1)), g1 = jax.value_and_grad(grouped, has_aux=True)(
        variables["params"], groups)
    (t2, (y2, s2)), g2 = jax.value_and_grad(separate, has_aux=True)(
        variables["params"], groups)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(y1)[~groups.any(0)] == 0)
    np.testing.assert_allclose(t1, t2, rtol=1e-5)
    for k in ("mean", "var"):
      np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-6)
    for k in ("scale", "bias"):
      np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5)
  # The order of the groups is the order of the running-average updates.
  _, (_, s_ab) = grouped(variables["params"], np.stack([a, b]))
  _, (_, s_ba) = grouped(variables["params"], np.stack([b, a]))
  assert not np.allclose(s_ab["var"], s_ba["var"])
  # The input gradient, against autodiff of the separate layers.
  dx1 = jax.grad(lambda x_: jnp.sum(bn.apply(
      variables, x_, train=True, mask=jnp.asarray(np.stack([a, b])),
      mutable=["batch_stats"])[0] * w))(x)
  dx2 = jax.grad(lambda x_: sum(jnp.sum(bn.apply(
      variables, x_, train=True, mask=jnp.asarray(g),
      mutable=["batch_stats"])[0] * w) for g in (a, b)))(x)
  np.testing.assert_allclose(dx1, dx2, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(dx1)[~(a | b)] == 0)


@pytest.mark.parametrize("grouped", [False, True])
def test_batchnorm_gradient_ignores_padding_rows_cotangent(grouped):
  """The padding rows' outputs are constant zeros, so their cotangent,
  whatever it is (inf and NaN included), changes no gradient, bit for bit:
  the backward masks it inside its channel sums (issue 11: without masking
  the whole cotangent, XLA:CPU compiles fewer kernels)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(0.3, 2.0, (6, 2, 3, 4)), jnp.float32)
  real = np.array([1, 1, 0, 1, 0, 1], bool)
  mask = np.stack([real & (np.arange(6) < 3), real & (np.arange(6) >= 3)]) \
      if grouped else real
  bn = resnet.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, True, jnp.asarray(mask))
  w = rng.normal(size=x.shape).astype(np.float32)

  def grads(weights):
    def loss(params, x_):
      y, _ = bn.apply({"params": params,
                       "batch_stats": variables["batch_stats"]}, x_,
                      train=True, mask=jnp.asarray(mask),
                      mutable=["batch_stats"])
      return jnp.sum(y * weights)   # the cotangent of y is ``weights``
    return jax.jit(jax.grad(loss, (0, 1)))(variables["params"], x)

  base = grads(jnp.asarray(w))
  pad = np.nonzero(~real)[0]
  odd = w.copy()
  odd[pad] = rng.normal(size=odd[pad].shape) * 1e30
  odd[pad[0], 0, 0, 0], odd[pad[1], 1, 2, 3] = np.inf, np.nan
  for a, b in zip(jax.tree_util.tree_leaves(base),
                  jax.tree_util.tree_leaves(grads(jnp.asarray(odd)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dx = np.asarray(base[1])
  assert np.all(dx[~real] == 0) and np.all(np.isfinite(dx))
  assert np.abs(dx[real]).max() > 0


def test_reduced_model_groups_equal_separate_passes(reduced):
  """The reduced ResNet-18 on two batches concatenated as two BatchNorm
  groups (plus padding rows) computes what two passes in turn compute
  (steps.apply_many): logits, running statistics and parameter gradients."""
  from bcl_jax.methods import steps
  model, variables, _ = reduced
  rng = np.random.default_rng(4)
  x1 = jnp.asarray(rng.random((3, 3072)), jnp.float32)
  x2 = jnp.asarray(rng.random((4, 3072)), jnp.float32)
  v1, v2 = jnp.array([1, 1, 0], bool), jnp.array([1, 0, 1, 1], bool)
  w = jnp.asarray(rng.normal(size=(7, 100)), jnp.float32)

  def separate(params):
    (l1, l2), new = steps.apply_many(
        model, {"params": params, "batch_stats": variables["batch_stats"]},
        [x1, x2], True, masks=[v1, v2])
    logits = jnp.concatenate([jnp.where(v1[:, None], l1, 0),
                              jnp.where(v2[:, None], l2, 0)])
    return jnp.sum(logits * w), (logits, new["batch_stats"])

  def grouped(params):
    x = jnp.concatenate([x1, x2, jnp.ones((2, 3072))])
    none3, none4 = jnp.zeros(3, bool), jnp.zeros(4, bool)
    groups = jnp.stack([jnp.concatenate([v1, none4, jnp.zeros(2, bool)]),
                        jnp.concatenate([none3, v2, jnp.zeros(2, bool)])])
    logits, new = model.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              x, True, groups)
    logits = jnp.where(groups.any(0)[:, None], logits, 0)[:7]
    return jnp.sum(logits * w), (logits, new["batch_stats"])

  (t1, (l1, s1)), g1 = jax.jit(jax.value_and_grad(separate, has_aux=True))(
      variables["params"])
  (t2, (l2, s2)), g2 = jax.jit(jax.value_and_grad(grouped, has_aux=True))(
      variables["params"])
  np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(t1, t2, rtol=1e-4)
  for a_, b_ in zip(jax.tree_util.tree_leaves(s1),
                    jax.tree_util.tree_leaves(s2)):
    np.testing.assert_allclose(a_, b_, rtol=1e-5, atol=1e-6)
  for a_, b_ in zip(jax.tree_util.tree_leaves(g1),
                    jax.tree_util.tree_leaves(g2)):
    scale = float(np.abs(a_).max()) + 1e-6
    np.testing.assert_allclose(a_ / scale, b_ / scale, atol=2e-4)
