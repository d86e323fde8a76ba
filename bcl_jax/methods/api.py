"""The method contract: what every continual-learning method provides.

A method is a module with a declaration, :data:`SPEC` (a :class:`MethodSpec`),
in the shape of optax's ``GradientTransformation``: a factory
``make(hp, ctx) -> Method`` returning a NamedTuple of pure functions over an
arrays-only state (a NamedTuple of arrays), extended with mammoth's hooks:

* ``init(key) -> state``
* ``begin_task(state, task, data) -> state``: before a task's first batch
  (the reference does this work at the first ``observe`` of a new task).
* ``observe(state, batch, key) -> (state, metrics)``: one online step;
  ``metrics["loss"]`` is a float32 scalar.
* ``end_task(state, task, data) -> state``: after a task's last batch and
  before its evaluation (EWC's Fisher, iCaRL's herding).
* ``prepare_eval(state, seen) -> eval_state`` and
  ``predict(eval_state, x, task) -> logits [N, n_outputs]``: evaluation asks
  the method for scores, so a method can adapt per task (test-time
  adaptation) or classify by nearest mean of exemplars (iCaRL). The loop
  takes the argmax over the task's columns.

``task`` is a traced int32 scalar and ``data`` a :class:`TaskData` with fixed
shapes, so every task of a benchmark runs the same executables. Because the
state holds arrays only, it is a ``lax.scan`` carry, is ``vmap``ped over
runs and is saved by orbax as it is.

The declaration lists the method's hyper-parameters (:class:`HParam`): their
defaults, which are *dynamic* (floats kept in ``state.hp``, so a sweep over
them is a ``vmap``) and which are static (they shape arrays or the program).
``validate`` raises one clear ``ValueError``. ``schedule`` says how the loop
feeds the data: ``"sequential"`` (task by task) or ``"joint"`` (every task's
data together once the last task arrives: the offline upper bound).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax.models import Model

SCHEDULES = ("sequential", "joint")


class HParam(NamedTuple):
  """One hyper-parameter of a method, as a flat config field.

  Attributes:
    name: the config field (named as the reference's flag).
    default: used when neither the user nor the benchmark's presets set it.
    help: one line for ``--list_fields`` and the README.
    dynamic: a float kept in ``state.hp``: sweepable in one vmapped program.
      Static fields (sizes, step counts, switches) fix the program.
  """

  name: str
  default: Any
  help: str
  dynamic: bool = False


class Batch(NamedTuple):
  """One online batch.

  Attributes:
    x: ``[B, *input_shape]`` inputs as stored (uint8 or float32).
    y: ``[B]`` int32 absolute labels.
    valid: ``[B]`` bool, False on padding rows (a short last batch).
    task: int32 scalar, the task being learned (in the joint schedule, the
      last task).
    tasks: ``[B]`` int32, each row's own task (equal to ``task`` in the
      sequential schedule; mixed in the joint one).
  """

  x: jax.Array
  y: jax.Array
  valid: jax.Array
  task: jax.Array
  tasks: jax.Array


class TaskData(NamedTuple):
  """A task's training data as the task-boundary hooks see it.

  Padded to the benchmark's largest task (``valid`` marks real rows), so
  every task's hooks run the same executable.
  """

  x: jax.Array
  y: jax.Array
  valid: jax.Array
  tasks: jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
  """Static facts about the benchmark a method is built for."""

  model: Model
  class_mask: np.ndarray  # bool [n_tasks, n_outputs]
  input_shape: tuple[int, ...]
  input_dtype: Any
  # Observe steps of each task's phase (batches x epochs), when known (the
  # training loop gives them; () otherwise): a method may size what it
  # compiles by how long it will run (bcl_dual's row buckets).
  steps_per_task: tuple[int, ...] = ()

  @property
  def n_tasks(self) -> int:
    return int(self.class_mask.shape[0])

  @property
  def n_outputs(self) -> int:
    return int(self.class_mask.shape[1])


class Method(NamedTuple):
  """The pure functions of a built method (see the module docstring)."""

  init: Callable
  begin_task: Callable
  observe: Callable
  end_task: Callable
  prepare_eval: Callable
  predict: Callable


class HParams(dict):
  """A method's resolved hyper-parameters: a dict with attribute access."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A method's declaration (one per method module, named ``SPEC``).

  Attributes:
    name: the value of ``config.method``.
    summary: one line for the README's methods table and error messages.
    hparams: its hyper-parameters.
    make: ``make(hp: HParams, ctx: Context) -> Method``.
    validate: ``validate(hp: HParams, config) -> None``: raises one clear
      ``ValueError`` (``config`` is the whole resolved config, for checks
      that involve the loop's fields such as ``batch_size``).
    schedule: ``"sequential"`` or ``"joint"``.
    cpu_batching: what ``run_batching="auto"`` means for this method on one
      CPU device: ``"map"`` (the runs one after another inside the step;
      the default, faster for most methods' small per-run matmuls) or
      ``"vmap"`` (batched; for a method whose unbatched step is slow).
  """

  name: str
  summary: str
  hparams: tuple[HParam, ...]
  make: Callable[[HParams, Context], Method]
  validate: Callable[[HParams, Any], None] = lambda hp, config: None
  schedule: str = "sequential"
  cpu_batching: str = "map"

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(h.name for h in self.hparams)

  @property
  def dynamic(self) -> tuple[str, ...]:
    return tuple(h.name for h in self.hparams if h.dynamic)

  def hparams_of(self, config) -> HParams:
    """This method's fields of ``config``, defaults where unset (None)."""
    return HParams({h.name: h.default if config.get(h.name) is None
                    else config.get(h.name) for h in self.hparams})


def init_hp(spec: MethodSpec, hp: HParams) -> dict[str, jax.Array]:
  """``state.hp``: the dynamic hyper-parameters as float32 scalars."""
  return {k: jnp.asarray(float(hp[k]), jnp.float32) for k in spec.dynamic}


def check(cond: bool, msg: str) -> None:
  """``validate`` helper: raises ``ValueError(msg)`` unless ``cond``."""
  if not cond:
    raise ValueError(msg)


def plain_eval(model: Model) -> tuple[Callable, Callable]:
  """``(prepare_eval, predict)`` of a method evaluated with its variables.

  ``state.variables`` in inference mode (BatchNorm running statistics).
  """

  def prepare_eval(state, seen):
    del seen
    return state.variables

  def predict(variables, x, task):
    del task
    return model.apply(variables, x, False)[0]

  return prepare_eval, predict


def no_hook(state, task, data):
  """A task-boundary hook that does nothing."""
  del task, data
  return state
