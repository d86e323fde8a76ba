"""The reference's MLP: ReLU hidden layers, Xavier-uniform weights, zero bias."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bcl_jax.models import Model, from_flax


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
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.xavier_uniform(),
                           bias_init=nn.initializers.zeros)(x))
    if self.return_features:
      return x
    return nn.Dense(self.n_outputs,
                    kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros)(x)


def make_mlp(input_shape, n_outputs: int, hidden=(128, 128, 128)) -> Model:
  module = MLP(hidden=tuple(int(h) for h in hidden), n_outputs=int(n_outputs))
  return from_flax(module, tuple(input_shape), name="mlp",
                   features_module=module.clone(return_features=True))
