"""ResNet-18s of the reference: the reduced one (CIFAR / miniImageNet) and the
torchvision one (CUB, ImageNet-pretrained).

Both follow PyTorch exactly where it changes numbers (spec section 4):

* :class:`BatchNorm` reproduces ``torch.nn.BatchNorm2d``: it normalises with
  the biased batch variance but folds the *unbiased* variance into
  ``running_var``; momentum 0.1 weights the new batch.
* Convolutions pad explicitly like PyTorch (``padding=1`` / ``3``), never
  ``"SAME"``, which pads asymmetrically for stride 2 on even sizes.
* Initialisation matches PyTorch's defaults (see :func:`torch_default_init`).
* Parameter paths mirror the PyTorch module names, so ``layer2.0.conv1.weight``
  is ``params["layer2"]["0"]["conv1"]["kernel"]`` and a torchvision state dict
  maps onto :class:`ResNet18` one to one (:func:`torchvision_names`).

Pooling. The reference's reduced net (``model/common.py::ResNet``, used by
BCL for CIFAR-100 and miniImageNet) has a max-pool 3x3/2 after the stem and an
``AdaptiveAvgPool2d((1, 1))`` head; so does ours (a mean over H and W). For
32x32 inputs the last stage is 2x2; for 84x84 it is 6x6 (84 -> 42 after the
pool -> 42, 21, 11, 6 through the stages) and both nets average it globally,
so 84x84 inputs give 160 features as well. GEM's older reduced ResNet has no
max-pool and a fixed ``avg_pool2d(out, 4)``, which is global only at 32x32 (its
4x4 last stage); at 84x84 it would leave a 2x2 map and break the linear layer.
We follow BCL. One difference at the input: the reference reshapes *flat*
inputs to ``(3, 32, 32)`` unconditionally (a flat 84x84 batch would crash
there), while :func:`images_to_nhwc` infers ``H = W = sqrt(D / 3)``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bcl_jax.models import Model, Variables, from_flax, to_float

Initializer = Callable[..., jax.Array]

STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


# ---------------------------------------------------------------------------
# Initialisers.


def torch_default_init() -> Initializer:
  """PyTorch's default conv / linear weight init.

  ``kaiming_uniform_(a=sqrt(5))`` has gain ``sqrt(2 / (1 + 5))`` and bound
  ``gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)``; a uniform variance scaling
  with scale 1/3 has bound ``sqrt(3 * scale / fan_in)``, the same. Flax's
  ``fan_in`` of an HWIO kernel is ``H * W * I``, PyTorch's too.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torchvision_conv_init() -> Initializer:
  """torchvision ResNet's ``kaiming_normal_(mode='fan_out', relu)``.

  N(0, 2 / fan_out) with ``fan_out = H * W * O``; JAX's ``"normal"`` is the
  untruncated one (``"truncated_normal"`` would differ).
  """
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ---------------------------------------------------------------------------
# Layers.


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` over the last (channel) axis.

  Training: ``y = (x - mu) / sqrt(var_b + eps) * scale + bias`` with ``mu``
  and the biased variance ``var_b`` over all other axes (``n`` values per
  channel); running averages become
  ``mean <- (1 - m) * mean + m * mu`` and
  ``var <- (1 - m) * var + m * var_b * n / (n - 1)``. Inference uses the
  running averages and changes nothing. Running statistics sit in the
  ``batch_stats`` collection as ``mean`` (init 0) and ``var`` (init 1); they
  carry no gradient, as buffers do in PyTorch.

  Attributes:
    momentum: weight of the new batch in the running averages (PyTorch's).
    epsilon: added to the variance before the square root.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``x``; ``mask`` (bool ``[N]``) marks the real rows.

    With a mask (training mode), the batch mean and variance, and the count
    ``n`` of the ``n / (n - 1)`` correction, come from the masked rows alone,
    so a padded batch gives the statistics of its unpadded rows; the output's
    padding rows are zeros. When no row is real the running averages are left
    as they are. (PyTorch would refuse a batch with
    a single value per channel; a traced count cannot raise, so ``n = 1``
    uses the correction 1, which multiplies a zero variance anyway.)

    A ``[G, N]`` mask holds ``G`` disjoint groups of rows: each group is
    normalised with its own statistics, as if it were its own forward pass,
    and the running averages take group 0's batch, then group 1's, and so
    on (an empty group leaves them alone). So one pass over several batches
    concatenated computes what that many passes in turn would
    (:func:`batch_norm_train_groups`).
    """
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean",
                                 lambda: jnp.zeros((c,), jnp.float32))
    running_var = self.variable("batch_stats", "var",
                                lambda: jnp.ones((c,), jnp.float32))
    if not train:
      mean, var = running_mean.value, running_var.value
      return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    if mask is not None and mask.ndim == 2:
      member = mask.astype(x.dtype)
      n = jnp.sum(member, axis=1) * math.prod(x.shape[1:-1])   # [G]
      y, mean, var = batch_norm_train_groups(
          x, scale, bias, member, jnp.maximum(n, 1.0), self.epsilon)
      if not self.is_initializing():
        correction = n / jnp.maximum(n - 1.0, 1.0)
        for g in range(mask.shape[0]):
          self._update_running(running_mean, running_var, mean[g],
                               var[g] * correction[g], n[g] > 0)
      return y
    if mask is None:
      n = math.prod(x.shape[:-1])
      if n < 2 and not self.is_initializing():
        # PyTorch refuses too: the unbiased variance of one value is 0/0.
        raise ValueError(
            f"BatchNorm in training mode needs more than one value per "
            f"channel, got input shape {x.shape}")
      real, count = None, jnp.float32(n)
      correction, any_real = n / max(n - 1, 1), True
    else:
      real = mask.reshape((-1,) + (1,) * (x.ndim - 1))
      n = jnp.sum(mask).astype(x.dtype) * math.prod(x.shape[1:-1])
      # max(n, 1): an all-padding batch gives mean = var = 0, not NaN.
      count = jnp.maximum(n, 1.0)
      correction, any_real = n / jnp.maximum(n - 1.0, 1.0), n > 0
    y, mean, var = batch_norm_train(x, scale, bias, real, count, self.epsilon)
    if not self.is_initializing():
      self._update_running(running_mean, running_var, mean, var * correction,
                           any_real)
    return y

  def _update_running(self, running_mean, running_var, mean, unbiased_var,
                      any_real):
    """One batch's step of the running averages (no gradient flows into
    them), skipped where ``any_real`` is False (no real row)."""
    m = self.momentum
    batch_mean = jax.lax.stop_gradient(mean)
    batch_var = jax.lax.stop_gradient(unbiased_var)
    new_mean = (1.0 - m) * running_mean.value + m * batch_mean
    new_var = (1.0 - m) * running_var.value + m * batch_var
    running_mean.value = jnp.where(any_real, new_mean, running_mean.value)
    running_var.value = jnp.where(any_real, new_var, running_var.value)


def _batch_stats(x, real, count):
  """Mean and biased variance over all axes but the last, of the real rows
  (``real`` broadcastable to ``x``; None: all), ``count`` values each."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.sum(x if real is None else jnp.where(real, x, 0.0), axis=axes)
  mean = mean / count
  sq = jnp.square(x - mean)
  var = jnp.sum(sq if real is None else jnp.where(real, sq, 0.0), axis=axes)
  return mean, var / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def batch_norm_train(x, scale, bias, real, count, epsilon):
  """BatchNorm's training-mode transform: ``(y, mean, var)``.

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with the batch mean and
  biased variance of the real rows (``real``: a bool array broadcastable to
  ``x``, or None for all rows; ``count``: the number of values per channel
  they hold); padding rows of ``y`` are zeros.

  The gradient is written out (the textbook BatchNorm backward: two channel
  sums of the cotangent, then one elementwise pass), instead of autodiff's
  through the mean and the variance, which on XLA:CPU reads and writes the
  activations several more times: forward + backward of the reduced
  ResNet-18 on 128 split-CIFAR rows 86 -> 74 ms (2-core AVX-512 CPU). The
  same maths; the float summation order differs. Cotangents of ``mean`` and
  ``var`` are honoured (the running statistics take them under
  ``stop_gradient``, so they are zero in training).
  """
  return _bn_fwd(x, scale, bias, real, count, epsilon)[0]


def _bn_fwd(x, scale, bias, real, count, epsilon):
  mean, var = _batch_stats(x, real, count)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * inv * scale + bias
  if real is not None:
    # Padding rows leave as zeros: normalised with the real rows' statistics
    # they could grow without bound (a near-zero variance scales by
    # 1/sqrt(eps) per layer) until inf * 0 poisons the sums and gradients.
    y = jnp.where(real, y, 0.0)
  return (y, mean, var), (x, mean, inv, scale, real, count)


def _bn_bwd(epsilon, res, cts):
  del epsilon
  x, mean, inv, scale, real, count = res
  dy, dmean, dvar = cts
  axes = tuple(range(x.ndim - 1))
  xc = x - mean
  xhat = xc * inv
  # The padding rows' cotangent is masked inside the two channel sums only:
  # their dx is zeroed below anyway. The same values as masking ``dy`` first
  # (for any cotangent), but XLA:CPU then fuses the cotangent's producer
  # (a conv's input gradient, a sum of shifted taps) into its consumers
  # instead of storing each tap: ~70-80 fewer kernels per network instance
  # (issue 11: 774 -> 704 at 62 rows; split CIFAR's chunk 2,572 -> 2,344).
  dyr = dy if real is None else jnp.where(real, dy, 0.0)
  dbias = jnp.sum(dyr, axis=axes)
  dscale = jnp.sum(dyr * xhat, axis=axes)
  # d/dx of the normalisation through the batch mean and variance, plus the
  # direct paths of the mean and variance outputs.
  dx = (inv * scale) * (dy - dbias / count - xhat * (dscale / count))
  dx = dx + dmean / count + (2.0 / count) * dvar * xc
  if real is not None:
    dx = jnp.where(real, dx, 0.0)
  return dx, dscale, dbias, None, jnp.zeros_like(count)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def _per_row(member, per_group, shape):
  """``[G, C]`` per-group values -> each row's group's, shaped to broadcast
  against ``x`` (rows in no group get zeros; exact: one term per row)."""
  return jnp.einsum("gn,gc->nc", member, per_group).reshape(shape)


def _row_sums(a):
  """Sums over all axes but the first (rows) and the last (channels)."""
  return jnp.sum(a, axis=tuple(range(1, a.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def batch_norm_train_groups(x, scale, bias, member, count, epsilon):
  """:func:`batch_norm_train` of ``G`` disjoint groups of rows at once:
  ``(y, mean [G, C], var [G, C])``.

  ``member`` (float 0/1 ``[G, N]``) marks each group's rows, ``count``
  (``[G]``) the values per channel each group holds. Each group's rows are
  normalised with that group's batch mean and biased variance, exactly as a
  separate pass over them would (the sums run in another order); rows in no
  group are padding and come out as zeros, with zero gradient. The
  backward is the textbook one per group (two channel sums of the cotangent
  per group, then one elementwise pass).
  """
  return _bn_groups_fwd(x, scale, bias, member, count, epsilon)[0]


def _bn_groups_fwd(x, scale, bias, member, count, epsilon):
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  real = (jnp.sum(member, axis=0) > 0).reshape((-1,) + (1,) * (x.ndim - 1))
  mean = (member @ _row_sums(x)) / count[:, None]
  xc = x - _per_row(member, mean, shape)
  var = (member @ _row_sums(jnp.square(xc))) / count[:, None]
  inv = jax.lax.rsqrt(var + epsilon)
  inv_row = _per_row(member, inv, shape)
  y = jnp.where(real, xc * (inv_row * scale) + bias, 0.0)
  return (y, mean, var), (xc, inv_row, scale, member, count, real)


def _bn_groups_bwd(epsilon, res, cts):
  del epsilon
  xc, inv_row, scale, member, count, real = res
  dy, dmean, dvar = cts
  shape = inv_row.shape
  xhat = xc * inv_row
  # Masked inside the sums only, as in _bn_bwd (the same values).
  dyr = jnp.where(real, dy, 0.0)
  dbias = member @ _row_sums(dyr)             # [G, C]
  dscale = member @ _row_sums(dyr * xhat)     # [G, C]
  per = lambda a: _per_row(member, a / count[:, None], shape)  # noqa: E731
  dx = (inv_row * scale) * (dy - per(dbias) - xhat * per(dscale))
  dx = dx + per(dmean) + 2.0 * per(dvar) * xc
  dx = jnp.where(real, dx, 0.0)
  return (dx, jnp.sum(dscale, 0), jnp.sum(dbias, 0), jnp.zeros_like(member),
          jnp.zeros_like(count))


batch_norm_train_groups.defvjp(_bn_groups_fwd, _bn_groups_bwd)


_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_raw(x: jax.Array, kernel: jax.Array, stride: int,
              padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=_DIMS)


# How :func:`conv2d` computes: "im2col" (shifted slices + one matmul),
# "conv" (XLA convolutions, :func:`conv2d_xla`) or "auto": im2col on CPU
# (except large stride-1 3x3 convs, :data:`XLA_CONV_MIN_PIXELS`), conv
# elsewhere. Read when a model is traced, so set it before compiling.
CONV_IMPL = os.environ.get("BCL_JAX_CONV", "auto")


def conv2d(x: jax.Array, kernel: jax.Array, stride: int,
           padding: int) -> jax.Array:
  """NHWC x HWIO convolution, symmetric zero padding, no bias.

  On XLA:CPU a convolution (and its gradient) is much slower than a matmul
  of the same FLOPs at this library's sizes (small images, 10-200 rows):
  measured per layer of the reduced ResNet-18 inside a ``lax.scan``, the
  im2col form is 1.2-7x faster forward+backward (the most on the 2x2 and
  4x4 late stages) and the whole network's step ~1.35x. On GPUs cuDNN's
  convolutions win, so ``"auto"`` (:data:`CONV_IMPL`) picks by backend.
  Both compute the same sums; only the float summation order differs.

  One exception on CPU (``"auto"`` only): a stride-1 3x3 convolution with
  at least 8 input channels over at least :data:`XLA_CONV_MIN_PIXELS`
  output pixels (``N * H * W``; 64 images of 16x16) runs as an XLA
  convolution; below 32 input channels from
  :data:`XLA_CONV_MIN_PIXELS_NARROW` (32 images of 16x16: the reduced
  ResNet-18's first stage, 16x16x20, from 32 rows). The im2col patches are
  9x the activations (24 MB at 128 images) and im2col falls off a cliff
  (measured forward + backward per conv inside ``lax.scan``, 2-core AVX-512
  CPU, before the blocked kernel gradient: 1.2 ms at 64 images, 2.1 at 96,
  8.6 at 128, against 1.3, 2.0, 2.6 for the XLA conv). Split CIFAR's inner
  passes (62 rows), outer pass (62 and 128 rows) and evaluation (100-500
  rows) cross it.
  """
  impl = CONV_IMPL
  if impl == "auto":
    impl = "im2col" if jax.default_backend() == "cpu" else "conv"
    if impl == "im2col" and _xla_wins_on_cpu(x, kernel, stride):
      impl = "conv"
  if impl == "im2col":
    return conv2d_im2col(x, kernel, stride, padding)
  if impl != "conv":
    raise ValueError(f"unknown conv implementation {impl!r} (BCL_JAX_CONV); "
                     "choose 'auto', 'im2col' or 'conv'")
  return conv2d_xla(x, kernel, stride, padding)


# The smallest ``N * H * W`` (output pixels of the batch) from which a
# stride-1 3x3 convolution with at least 8 input channels runs as an XLA
# convolution on CPU under ``CONV_IMPL="auto"`` (see :func:`conv2d`); 0
# turns the rule off. Read when a model is traced.
XLA_CONV_MIN_PIXELS = int(os.environ.get("BCL_JAX_XLA_CONV_MIN_PIXELS",
                                         str(64 * 16 * 16)))

# The same threshold for narrow convolutions (8 to
# XLA_CONV_NARROW_CHANNELS - 1 input channels: the reduced ResNet-18's first
# stage, 20 channels): since the XLA path's kernel gradient is blocked
# (DK_BLOCK_ROWS) they win from 32 images of 16x16. Measured on a 2-core
# AVX-512 CPU, the first stage's two blocks forward + backward inside
# ``lax.scan``: 16 / 24 / 32 / 48 / 62 images of 16x16, im2col 6.4 / 10.9 /
# 13.5 / 21.9 / 32-38 ms against 6.2 / 11.3 / 11.2 / 16.0 / 23-25 ms; 5 and
# 6 images of miniImageNet's 42x42, 14.7-23.5 / 16.9-17.8 against 11.2-13.8
# / 12.7-15.3 ms (three runs each). The second stage (40 channels) keeps
# XLA_CONV_MIN_PIXELS: at 32 images of 21x21 im2col took 60 ms against 75.
XLA_CONV_MIN_PIXELS_NARROW = int(os.environ.get(
    "BCL_JAX_XLA_CONV_MIN_PIXELS_NARROW", str(32 * 16 * 16)))
XLA_CONV_NARROW_CHANNELS = 32


def _xla_wins_on_cpu(x: jax.Array, kernel: jax.Array, stride: int) -> bool:
  kh, kw, cin, _ = kernel.shape
  n, h, w, _ = x.shape
  least = (XLA_CONV_MIN_PIXELS_NARROW if cin < XLA_CONV_NARROW_CHANNELS
           else XLA_CONV_MIN_PIXELS)
  return (least > 0 and stride == 1 and kh == kw == 3
          and cin >= 8 and n * h * w >= least)


def _patches(x: jax.Array, kh: int, kw: int, stride: int,
             padding: int) -> jax.Array:
  """im2col of NHWC ``x``: ``[N, Ho, Wo, kh * kw * I]``, HWIO order: the
  shifted strided slices of the padded input concatenated on channels."""
  h, w = x.shape[1:3]
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (h + 2 * padding - kh) // stride + 1
  wo = (w + 2 * padding - kw) // stride + 1
  cols = [x[:, i:i + stride * (ho - 1) + 1:stride,
            j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, stride: int,
                  padding: int) -> jax.Array:
  """:func:`conv2d` as im2col patches (:func:`_patches`) times the
  ``[kh*kw*I, O]`` kernel. Its autodiff gradient is pads, slices and two
  matmuls."""
  kh, kw, cin, cout = kernel.shape
  patches = _patches(x, kh, kw, stride, padding)
  n, ho, wo, k = patches.shape
  out = jnp.dot(patches.reshape(n * ho * wo, k), kernel.reshape(k, cout))
  return out.reshape(n, ho, wo, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_xla(x: jax.Array, kernel: jax.Array, stride: int,
               padding: int) -> jax.Array:
  """:func:`conv2d` as an XLA convolution with a hand-written gradient.

  Its gradient is written with convolutions in the same canonical NHWC/HWIO
  layout plus explicit transposes, instead of JAX's default transpose rules,
  which swap dimension numbers. The maths is the same (bit-identical
  results in the tests), but XLA:CPU runs such non-canonical convolutions
  ~30-50x slower inside a ``while`` loop, i.e. inside every ``lax.scan`` of
  the training loop, where all our gradients are taken. Reverse mode only
  (``custom_vjp``); second derivatives go through the rule's own convs.
  """
  return _conv_raw(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _conv_raw(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # d/dx: a stride-1 conv of the (stride-)dilated cotangent with the flipped,
  # in/out-swapped kernel; input rows the forward never reached get zeros.
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  pads = [(k - 1 - padding, k - 1 - padding + (n + 2 * padding - k) % stride)
          for n, k in ((x.shape[1], kh), (x.shape[2], kw))]
  dx = jax.lax.conv_general_dilated(
      dy, flipped, (1, 1), pads, lhs_dilation=(stride, stride),
      dimension_numbers=_DIMS)
  if DK_BLOCK_ROWS > 0 and jax.default_backend() == "cpu":
    dk = _kernel_grad_blocked(x, dy, kh, kw, stride, padding)
  else:
    # d/dkernel: channels as the batch, the batch as features, the cotangent
    # (dilated by the stride) as the kernel; the result is [I, >=kh, >=kw, O].
    dk = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
        ((padding, padding), (padding, padding)),
        rhs_dilation=(stride, stride), dimension_numbers=_DIMS)
    dk = dk[:, :kh, :kw, :].transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


# Rows of im2col patches per block of :func:`_kernel_grad_blocked` (16
# images of 16x16 outputs); 0 takes the kernel gradient as one XLA
# convolution on CPU too. Read when a model is traced.
DK_BLOCK_ROWS = int(os.environ.get("BCL_JAX_DK_BLOCK_ROWS", "4096"))


def _kernel_grad_blocked(x, dy, kh, kw, stride, padding):
  """The kernel gradient ``sum_b patches(x_b)^T dy_b`` over blocks of images.

  On XLA:CPU the kernel gradient as one convolution (the batch as features,
  the cotangent as a 16x16 kernel, with two transposes) ran at ~60 GFLOP/s:
  3.6 ms of split CIFAR's stage-1 conv at 128 rows, whose forward and input
  gradient take 0.8 ms each; patches of the whole batch at once (24 MB)
  fall out of cache (4.7 ms). A ``lax.scan`` over blocks of
  :data:`DK_BLOCK_ROWS` patch rows keeps each block's patches in cache:
  1.9 ms (2-core AVX-512 CPU). The same sums in another order.
  """
  n, ho, wo, o = dy.shape
  c = x.shape[-1]

  def block(xb, db):
    p = _patches(xb, kh, kw, stride, padding).reshape(-1, kh * kw * c)
    return p.T @ db.reshape(-1, o)

  per = max(1, DK_BLOCK_ROWS // (ho * wo))
  if per >= n:
    return block(x, dy).reshape(kh, kw, c, o)
  nb, rest = divmod(n, per)
  xs = x[:nb * per].reshape((nb, per) + x.shape[1:])
  ds = dy[:nb * per].reshape((nb, per) + dy.shape[1:])
  dk, _ = jax.lax.scan(lambda acc, xd: (acc + block(*xd), None),
                       jnp.zeros((kh * kw * c, o), dy.dtype), (xs, ds))
  if rest:
    dk = dk + block(x[nb * per:], dy[nb * per:])
  return dk.reshape(kh, kw, c, o)


conv2d_xla.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """A bias-free square conv with PyTorch's explicit symmetric padding.

  Same parameter (``kernel``, HWIO) and init as ``nn.Conv``; it runs
  :func:`conv2d`.

  Attributes:
    features: output channels.
    kernel_size: height and width of the kernel.
    stride: stride in both dimensions.
    padding: zero rows / columns added on each side.
    kernel_init: initialiser of the kernel.
  """

  features: int
  kernel_size: int
  stride: int
  padding: int
  kernel_init: Initializer

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    return conv2d(x, kernel, self.stride, self.padding)


def _conv(features: int, kernel: int, stride: int, padding: int,
          init: Initializer, name: str) -> Conv:
  return Conv(features, kernel, stride, padding, init, name=name)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return max_pool(x, 3, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int,
             padding: int) -> jax.Array:
  """``torch.nn.MaxPool2d(window, stride, padding)`` on NHWC ``x``.

  The maximum of the ``window ** 2`` strided slices of ``x`` padded with
  -inf. The gradient goes to the first maximum of each window in row-major
  order, as PyTorch's (ties are common: the input is a ReLU's output). The
  same values and gradients as ``flax.linen.max_pool``, whose gradient on
  XLA:CPU (``select_and_scatter`` over packed 64-bit pairs) cost ~23 ms of
  a 240 ms split-CIFAR step; this one is elementwise selects and pads
  (128 x 32 x 32 x 20: forward + backward 40 -> 5 ms). Only the float
  order of a gradient summed over overlapping windows may differ.
  """
  return _pool_fwd(x, window, stride, padding)[0]


def _pool_taps(x, window, stride, padding):
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=-jnp.inf)
  ho = (h + 2 * padding - window) // stride + 1
  wo = (w + 2 * padding - window) // stride + 1
  span = (stride * (ho - 1) + 1, stride * (wo - 1) + 1)
  return [xp[:, i:i + span[0]:stride, j:j + span[1]:stride, :]
          for i in range(window) for j in range(window)]


def _pool_fwd(x, window, stride, padding):
  taps = _pool_taps(x, window, stride, padding)
  y = taps[0]
  for t in taps[1:]:
    y = jnp.maximum(y, t)
  # The tap of each window's first maximum, computed once here: in the
  # backward pass each input position then tests one small integer per tap
  # (deriving it there made XLA re-derive the whole first-maximum chain at
  # every input position: 10 ms of a 128-row backward instead of ~3).
  first = jnp.full(y.shape, float(len(taps)), jnp.float32)
  for k in reversed(range(len(taps))):
    first = jnp.where(taps[k] == y, float(k), first)
  # XLA:CPU would still fuse this chain into the backward's consumers and
  # re-derive it there (from the padded input, at each of up to four taps
  # per input position); stored (exact: small integers), split CIFAR's stem,
  # forward + backward at 128 rows, 12.2 -> 10.8 ms, same process
  # interleaved.
  return y, (_stored(first).astype(jnp.int8), x.shape)


def _stored(a: jax.Array) -> jax.Array:
  """``a`` unchanged, as one array XLA:CPU computes once.

  XLA:CPU fuses an elementwise producer into each of its consumers and
  recomputes it there (``optimization_barrier`` does not stop that). A
  product with the identity over the last axis is a matmul, which is never
  fused into a consumer, so ``a`` is stored once; it is exact for finite
  values (each output is one value times 1 plus zeros) and costs ~0.1 ms
  for split CIFAR's largest activations.
  """
  c = a.shape[-1]
  return (a.reshape(-1, c) @ jnp.eye(c, dtype=a.dtype)).reshape(a.shape)


def _pool_bwd(window, stride, padding, res, dy):
  first, (n, h, w, c) = res
  # dy is read by every tap; XLA:CPU would fuse its producer (the next
  # conv's input gradient, a sum of nine shifted slices) into each of them
  # and compute it nine times; stored once: split-CIFAR step 202 -> 194 ms,
  # same process, interleaved.
  dy = _stored(dy)
  hp, wp = h + 2 * padding, w + 2 * padding
  ho, wo = dy.shape[1:3]
  taps = [jnp.where(first == k, dy, 0.0) for k in range(window * window)]
  if (window, stride) == (3, 2) and hp == 2 * (ho + 1) and wp == 2 * (wo + 1):
    dxp = _scatter_3x3_s2(taps)
  else:
    span = (stride * (ho - 1) + 1, stride * (wo - 1) + 1)
    dxp = None
    for k, g in enumerate(taps):
      i, j = divmod(k, window)
      # Each output's cotangent back at its tap's input position: stride - 1
      # zeros between outputs, offset (i, j).
      g = jax.lax.pad(g, jnp.zeros((), dy.dtype),
                      ((0, 0, 0), (i, hp - i - span[0], stride - 1),
                       (j, wp - j - span[1], stride - 1), (0, 0, 0)))
      dxp = g if dxp is None else dxp + g
  return (dxp[:, padding:padding + h, padding:padding + w, :],)


def _scatter_3x3_s2(taps):
  """The padded input's cotangent of a 3x3 stride-2 pool, by parity planes.

  Padded position ``(2m + a, 2n + b)`` is reached by tap row ``1`` of
  output row ``m`` when ``a = 1``, and by tap rows ``0`` of ``m`` and ``2``
  of ``m - 1`` when ``a = 0`` (columns alike). So each of the four planes is
  a sum of one to four shifted ``[ho, wo]`` tap cotangents, and the planes
  interleave into the ``[2 (ho + 1), 2 (wo + 1)]`` result: about one
  input's worth of memory instead of nine padded copies summed.
  """
  def shifted(g, down, right):   # [ho, wo] -> [ho + 1, wo + 1], offset
    return jnp.pad(g, ((0, 0), (down, 1 - down), (right, 1 - right), (0, 0)))

  t = lambda i, j: taps[3 * i + j]  # noqa: E731
  ee = (shifted(t(0, 0), 0, 0) + shifted(t(0, 2), 0, 1)
        + shifted(t(2, 0), 1, 0) + shifted(t(2, 2), 1, 1))
  eo = shifted(t(0, 1), 0, 0) + shifted(t(2, 1), 1, 0)
  oe = shifted(t(1, 0), 0, 0) + shifted(t(1, 2), 0, 1)
  oo = shifted(t(1, 1), 0, 0)
  # [N, ho + 1, a, wo + 1, b, C] -> [N, 2 (ho + 1), 2 (wo + 1), C]
  planes = jnp.stack([jnp.stack([ee, eo], 3), jnp.stack([oe, oo], 3)], 2)
  n, m, _, k, _, c = planes.shape
  return planes.reshape(n, 2 * m, 2 * k, c)


max_pool.defvjp(_pool_fwd, _pool_bwd)


class _Projection(nn.Module):
  """1x1 strided conv + BN shortcut; children ``0`` and ``1`` as in PyTorch's
  ``nn.Sequential``."""

  features: int
  stride: int
  conv_init: Initializer

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    x = _conv(self.features, 1, self.stride, 0, self.conv_init, "0")(x)
    return BatchNorm(name="1")(x, train, mask)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

  Attributes:
    features: output channels.
    stride: stride of the first conv and of the projection.
    conv_init: kernel initialiser of all convs.
    shortcut_name: the projection's name, ``"shortcut"`` in the reference's
      reduced net and ``"downsample"`` in torchvision.
  """

  features: int
  stride: int
  conv_init: Initializer
  shortcut_name: str = "shortcut"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    out = _conv(self.features, 3, self.stride, 1, self.conv_init, "conv1")(x)
    out = nn.relu(BatchNorm(name="bn1")(out, train, mask))
    out = _conv(self.features, 3, 1, 1, self.conv_init, "conv2")(out)
    out = BatchNorm(name="bn2")(out, train, mask)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _Projection(self.features, self.stride, self.conv_init,
                      name=self.shortcut_name)(x, train, mask)
    return nn.relu(out + x)


class _Stage(nn.Module):
  """``n_blocks`` BasicBlocks named ``0, 1, ...``; only the first strides."""

  features: int
  stride: int
  n_blocks: int
  conv_init: Initializer
  shortcut_name: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.n_blocks):
      x = BasicBlock(self.features, self.stride if i == 0 else 1,
                     self.conv_init, self.shortcut_name, name=str(i))(
                         x, train, mask)
    return x


def _trunk(x: jax.Array, train: bool, widths: Sequence[int],
           conv_init: Initializer, shortcut_name: str,
           mask: jax.Array | None = None) -> jax.Array:
  """``layer1..layer4`` then global average pooling -> ``[N, widths[-1]]``.

  Must be called inside a compact method: the stages attach to its module.
  """
  for i, (width, stride, n_blocks) in enumerate(
      zip(widths, STAGE_STRIDES, BLOCKS_PER_STAGE)):
    x = _Stage(width, stride, n_blocks, conv_init, shortcut_name,
               name=f"layer{i + 1}")(x, train, mask)
  return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))


def _linear(n_outputs: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(n_outputs, kernel_init=torch_default_init(),
                  bias_init=torch_default_bias_init(fan_in), name=name)


class ReducedResNet18(nn.Module):
  """The reference's reduced ResNet-18 (``model/common.py::ResNet18``).

  conv3x3(3 -> nf) + BN + ReLU + max-pool 3x3/2, stages of widths nf, 2nf,
  4nf, 8nf, global average pool, ``linear``. Takes NHWC input.

  Attributes:
    n_outputs: logits.
    nf: width of the first stage (20 in the reference).
    return_features: return the pooled ``[N, 8nf]`` features, not logits.
  """

  n_outputs: int
  nf: int = 20
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    init = torch_default_init()
    x = _conv(self.nf, 3, 1, 1, init, "conv1")(x)
    x = nn.relu(BatchNorm(name="bn1")(x, train, mask))
    x = _max_pool_3x3_s2(x)
    widths = [self.nf * k for k in (1, 2, 4, 8)]
    x = _trunk(x, train, widths, init, "shortcut", mask)
    if self.return_features:
      return x
    return _linear(self.n_outputs, x.shape[-1], "linear")(x)


class ResNet18(nn.Module):
  """torchvision's ResNet-18 with an ``n_outputs`` ``fc``. Takes NHWC input.

  Convs use torchvision's kaiming-normal (fan_out) init; ``fc`` PyTorch's
  default linear init, like the fresh layer the reference puts on top of the
  pretrained trunk.

  Attributes:
    n_outputs: logits.
    return_features: return the pooled ``[N, 512]`` features, not logits.
  """

  n_outputs: int
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    init = torchvision_conv_init()
    x = _conv(64, 7, 2, 3, init, "conv1")(x)
    x = nn.relu(BatchNorm(name="bn1")(x, train, mask))
    x = _max_pool_3x3_s2(x)
    x = _trunk(x, train, (64, 128, 256, 512), init, "downsample", mask)
    if self.return_features:
      return x
    return _linear(self.n_outputs, x.shape[-1], "fc")(x)


# ---------------------------------------------------------------------------
# Inputs and the Model.


def images_to_nhwc(x: jax.Array) -> jax.Array:
  """Stored images -> float32 NHWC.

  Args:
    x: ``[N, 3*H*W]`` flat channel-first rows (CIFAR pickle order: all red,
      then green, then blue; ``H = W = sqrt(D / 3)``) or ``[N, 3, H, W]``;
      uint8 (scaled by 1/255) or float in [0, 1].

  Returns:
    ``[N, H, W, 3]`` float32.

  Raises:
    ValueError: on any other shape.
  """
  x = to_float(x)
  if x.ndim == 2:
    n, d = x.shape
    side = math.isqrt(d // 3)
    if 3 * side * side != d:
      raise ValueError(f"flat image rows need 3*H*H values, got {d}")
    x = x.reshape(n, 3, side, side)
  elif x.ndim != 4 or x.shape[1] != 3:
    raise ValueError(
        f"expected images [N, 3*H*W] or [N, 3, H, W], got shape {x.shape}")
  return jnp.transpose(x, (0, 2, 3, 1))


def make_resnet(name: str, input_shape: tuple[int, ...],
                n_outputs: int) -> Model:
  """Builds ``"resnet18_reduced"`` (nf = 20) or ``"resnet18"`` as a Model.

  Args:
    name: which network.
    input_shape: one stored example's shape, ``(3*H*W,)`` or ``(3, H, W)``.
    n_outputs: logits.

  Returns:
    A :class:`~bcl_jax.models.Model` whose ``apply`` takes raw stored batches.
  """
  if name == "resnet18_reduced":
    module = ReducedResNet18(n_outputs=int(n_outputs))
  elif name == "resnet18":
    module = ResNet18(n_outputs=int(n_outputs))
  else:
    raise ValueError(f"unknown ResNet {name!r}; "
                     "choose 'resnet18_reduced' or 'resnet18'")
  images_to_nhwc(jnp.zeros((1,) + tuple(input_shape), jnp.float32))  # check
  return from_flax(module, tuple(input_shape), name=name,
                   preprocess=images_to_nhwc,
                   features_module=module.clone(return_features=True))


# ---------------------------------------------------------------------------
# Pretrained weights (torchvision names).

_PARAM_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_LEAF = {"mean": "running_mean", "var": "running_var"}


def torchvision_names(variables: Variables) -> dict[str, tuple[str, tuple]]:
  """Maps PyTorch state-dict keys to ``(collection, path)`` in ``variables``.

  E.g. ``"layer2.0.downsample.1.running_var"`` ->
  ``("batch_stats", ("layer2", "0", "downsample", "1", "var"))``.
  """
  names = {}
  for collection, leaves in (("params", _PARAM_LEAF),
                             ("batch_stats", _STAT_LEAF)):
    flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path in flat:
      key = ".".join(path[:-1] + (leaves[path[-1]],))
      names[key] = (collection, path)
  return names


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch layout of a Flax shape: HWIO -> OIHW, [in, out] -> [out, in]."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO, [out, in] -> [in, out]; vectors unchanged."""
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  return array.T


def _describe(keys: set[str], limit: int = 8) -> str:
  shown = sorted(keys)[:limit]
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(shown) + more


def load_pretrained_npz(variables: Variables, path: str) -> Variables:
  """Loads torchvision-named ResNet-18 weights into :class:`ResNet18` vars.

  The ``.npz`` holds one array per state-dict key in PyTorch layout (as
  written by ``scripts/convert_torchvision_resnet18.py``). Conv kernels are
  transposed OIHW -> HWIO. ``fc.*`` is skipped: the reference replaces the
  ImageNet classifier with a fresh ``n_outputs`` layer, so ours keeps its
  init. ``*.num_batches_tracked`` counters, if present, are ignored (they only
  matter for ``momentum=None`` in PyTorch).

  Args:
    variables: ``{"params", "batch_stats"}`` of a ``resnet18`` Model.
    path: the ``.npz`` file.

  Returns:
    New variables; ``variables`` itself is not modified.

  Raises:
    ValueError: the file is missing or unreadable, keys are missing or
      unexpected, or an array's shape does not fit; the message names the
      key(s) and the file.
  """
  if not os.path.isfile(path):
    raise ValueError(f"pretrained weights file {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except Exception as e:  # a zip / npy format error of any kind
    raise ValueError(f"cannot read pretrained weights {path!r}: {e}") from e
  return load_pretrained_arrays(variables, arrays, path)


def read_torchvision_pth(path: str) -> dict[str, np.ndarray]:
  """A torchvision ``.pth`` state dict -> float32 arrays, without torch.

  Read by :func:`bcl_jax.data.torch_pickle.load_torch` (a pickle
  allow-list, nothing executed); a ``{"state_dict": ...}`` checkpoint is
  unwrapped and ``num_batches_tracked`` counters are dropped.

  Raises:
    ValueError: not a torch file, or not a dict of arrays.
  """
  from bcl_jax.data.errors import DataError
  from bcl_jax.data.torch_pickle import load_torch
  if not os.path.isfile(path):
    raise ValueError(f"pretrained weights file {path!r} does not exist")
  try:
    obj = load_torch(path)
  except DataError as e:
    raise ValueError(f"cannot read pretrained weights {path!r}: {e}") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"pretrained weights {path!r} hold a "
                     f"{type(obj).__name__}, expected a state dict")
  out = {}
  for key, value in obj.items():
    if str(key).endswith("num_batches_tracked"):
      continue
    if not isinstance(value, np.ndarray):
      raise ValueError(f"pretrained weights {path!r}: {key!r} is a "
                       f"{type(value).__name__}, expected a tensor")
    out[str(key)] = value.astype(np.float32)
  return out


def load_pretrained(variables: Variables, path: str) -> Variables:
  """:func:`load_pretrained_npz` for ``.npz``, torchvision ``.pth`` too."""
  if path.endswith((".pth", ".pt")):
    return load_pretrained_arrays(variables, read_torchvision_pth(path), path)
  return load_pretrained_npz(variables, path)


def load_pretrained_arrays(variables: Variables,
                           arrays: dict[str, np.ndarray],
                           path: str) -> Variables:
  """The body of :func:`load_pretrained_npz` on arrays already read."""
  names = torchvision_names(variables)
  wanted = {k for k in names if not k.startswith("fc.")}
  given = {k for k in arrays
           if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  if wanted - given:
    raise ValueError(f"pretrained weights {path!r} lack "
                     f"{len(wanted - given)} key(s): {_describe(wanted - given)}")
  if given - wanted:
    raise ValueError(f"pretrained weights {path!r} have {len(given - wanted)} "
                     f"unexpected key(s): {_describe(given - wanted)}")

  flat = {c: traverse_util.flatten_dict(dict(variables[c]))
          for c in ("params", "batch_stats")}
  for key in sorted(wanted):
    collection, leaf_path = names[key]
    target = flat[collection][leaf_path]
    array = np.asarray(arrays[key])
    needed = _torch_shape(tuple(target.shape))
    if array.shape != needed:
      raise ValueError(
          f"pretrained weights {path!r}: {key!r} has shape {array.shape}, "
          f"the model needs {needed} (PyTorch layout)")
    array = _to_flax_layout(array)
    flat[collection][leaf_path] = jnp.asarray(array, dtype=target.dtype)
  out: dict[str, Any] = dict(variables)
  for c in ("params", "batch_stats"):
    out[c] = traverse_util.unflatten_dict(flat[c])
  return out
