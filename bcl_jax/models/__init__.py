"""Networks as pairs of pure functions.

A :class:`Model` hides Flax behind two functions so methods never see module
objects:

* ``init(key) -> variables``: ``{"params": ..., "batch_stats": ...}``
  (``batch_stats`` is an empty dict for networks without BatchNorm).
* ``apply(variables, x, train, mask=None) -> (logits, variables)``: ``x`` is
  a raw batch
  as stored (float32 in [0, 1] or uint8, flat or ``[N, C, H, W]``); the model
  scales and reshapes it. With ``train=True`` BatchNorm uses batch statistics
  and the returned variables carry the updated running averages; with
  ``train=False`` it uses the running averages and returns ``variables``
  unchanged. ``mask`` (bool ``[N]``, training mode only) marks the real rows
  of a padded batch: BatchNorm's batch statistics use those rows alone.
* ``features(variables, x) -> [N, d]`` (optional, None if the network has
  none): the penultimate representation, the input of the last linear layer,
  in inference mode (iCaRL's herding and nearest-mean classifier use it).
* ``first_dense`` (optional): :class:`FirstDense`, for networks whose first
  layer is dense on the flattened input.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Variables = Any


class FirstDense(NamedTuple):
  """A network whose first layer is dense on the flattened input (the MLP).

  That layer's weight gradient on a batch is ``X^T dZ`` (``X`` the layer's
  input, ``dZ`` the loss's gradient at its output), so inner products of
  such gradients factor through ``X X'^T`` and ``dZ dZ'^T`` without forming
  the ``[D, H]`` matrices: GEM's past-task dot products use this.

  Attributes:
    inputs: raw batch -> ``[N, D]``, what the layer multiplies.
    kernel: the path of its ``[D, H]`` kernel in ``params``.
    apply: ``(variables, x, dz) -> logits`` in training mode, with ``dz``
      (``[N, H]``) added to the layer's output before its activation; its
      gradient in ``dz`` at zero is ``dZ``.
  """

  inputs: Callable[[jax.Array], jax.Array]
  kernel: tuple[str, ...]
  apply: Callable[[Variables, jax.Array, jax.Array], jax.Array]


class Model(NamedTuple):
  init: Callable[[jax.Array], Variables]
  apply: Callable[[Variables, jax.Array, bool], tuple[jax.Array, Variables]]
  name: str = "model"
  features: Callable[[Variables, jax.Array], jax.Array] | None = None
  first_dense: FirstDense | None = None


def to_float(x: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]; floats pass through as float32."""
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def from_flax(module, input_shape: tuple[int, ...], name: str,
              preprocess: Callable[[jax.Array], jax.Array] = to_float,
              features_module=None) -> Model:
  """Wraps a Flax module whose ``__call__(x, train)`` returns logits.

  ``features_module``: the same network (same parameter names) returning its
  penultimate features instead; it gives the Model's ``features``.
  """

  def init(key):
    dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
    variables = module.init(key, preprocess(dummy), train=False)
    variables = dict(variables)
    variables.setdefault("batch_stats", {})
    return {"params": variables["params"],
            "batch_stats": variables["batch_stats"]}

  def apply(variables, x, train, mask=None):
    x = preprocess(x)
    if train and jax.tree_util.tree_leaves(variables["batch_stats"]):
      kw = {} if mask is None else {"mask": mask}
      logits, updates = module.apply(variables, x, train=True,
                                     mutable=["batch_stats"], **kw)
      return logits, {"params": variables["params"],
                      "batch_stats": updates["batch_stats"]}
    return module.apply(variables, x, train=train), variables

  features = None
  if features_module is not None:
    def features(variables, x):
      # Inference mode; the last layer's parameters are simply unused.
      return features_module.apply(
          {"params": variables["params"],
           "batch_stats": variables["batch_stats"]}, preprocess(x),
          train=False)

  return Model(init=init, apply=apply, name=name, features=features)


def build_model(name: str, input_shape: tuple[int, ...], n_outputs: int,
                hidden: tuple[int, ...] = (128, 128, 128),
                pretrained: str = "") -> Model:
  """Builds a network by name.

  ``"auto"`` picks the reference's choice from the input shape: the MLP for
  flat inputs of 784, the reduced ResNet-18 for 32x32 / 84x84 images, the full
  ResNet-18 for 224x224.

  ``pretrained`` (``resnet18`` only): ``''`` (random init), a ``.npz`` from
  ``scripts/convert_torchvision_resnet18.py``, a torchvision ``.pth``,
  ``"torchvision"`` (the ImageNet weights, downloaded once and checked) or
  a URL of such a ``.pth``; see
  :func:`bcl_jax.data.download.resolve_pretrained`.
  """
  from bcl_jax.models import mlp  # local: keeps import cheap for data tools
  if name == "auto":
    n = 1
    for d in input_shape:
      n *= d
    if len(input_shape) == 1 and n != 3072:
      name = "mlp"
    elif n in (3072, 3 * 84 * 84):
      name = "resnet18_reduced"
    else:
      name = "resnet18"
  if pretrained and name != "resnet18":
    raise ValueError(f"pretrained weights ({pretrained}) are only supported "
                     f"for model 'resnet18', not {name!r}")
  if name == "mlp":
    return mlp.make_mlp(input_shape, n_outputs, hidden)
  if name in ("resnet18_reduced", "resnet18"):
    from bcl_jax.models import resnet
    model = resnet.make_resnet(name, input_shape, n_outputs)
    if pretrained:
      # "torchvision" / a URL are fetched now, once, not in every init.
      from bcl_jax.data.download import resolve_pretrained
      path = resolve_pretrained(pretrained)
      base_init = model.init

      def init(key):
        return resnet.load_pretrained(base_init(key), path)
      model = model._replace(init=init)
    return model
  raise ValueError(f"unknown model {name!r}; choose one of "
                   "'auto', 'mlp', 'resnet18_reduced', 'resnet18'")
