"""The reference's MLP: ReLU hidden layers, Xavier-uniform weights, zero bias."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bcl_jax.models import FirstDense, Model, from_flax, to_float


class MLP(nn.Module):
  """``n_inputs -> hidden... -> n_outputs`` with ReLU between layers.

  ``nn.initializers.xavier_uniform`` draws from U(-a, a) with
  ``a = sqrt(6 / (fan_in + fan_out)) = sqrt(3) * sqrt(2 / (fan_in + fan_out))``,
  the reference's ``xavier_uniform_`` with gain 1 (spec section 4).
  """

  hidden: tuple[int, ...]
  n_outputs: int
  return_features: bool = False  # the last hidden layer instead of logits

  @nn.compact
  def __call__(self, x, train: bool = False, dz=None):
    """``dz`` (``[N, hidden[0]]``, optional) is added to the first layer's
    output before its ReLU (see :class:`~bcl_jax.models.FirstDense`)."""
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros)(x)
      if i == 0 and dz is not None:
        x = x + dz
      x = nn.relu(x)
    if self.return_features:
      return x
    return nn.Dense(self.n_outputs,
                    kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros)(x)


def make_mlp(input_shape, n_outputs: int, hidden=(128, 128, 128)) -> Model:
  module = MLP(hidden=tuple(int(h) for h in hidden), n_outputs=int(n_outputs))
  model = from_flax(module, tuple(input_shape), name="mlp",
                    features_module=module.clone(return_features=True))
  if not module.hidden:
    return model

  def inputs(x):
    x = to_float(x)
    return x.reshape((x.shape[0], -1))

  def apply_dz(variables, x, dz):
    return module.apply({"params": variables["params"]}, inputs(x),
                        train=True, dz=dz)

  return model._replace(first_dense=FirstDense(
      inputs=inputs, kernel=("Dense_0", "kernel"), apply=apply_dz))
