"""Hyper-parameters several methods share, declared once.

Names follow the reference's command-line flags; defaults are the paper's
permuted-MNIST values (BCL-Dual), which benchmark configs override through
their ``presets``. A method lists the ones it uses in its ``SPEC``; one of its
own is declared in its module.
"""

from bcl_jax.methods.api import HParam

LR = HParam("lr", 0.03, "SGD learning rate", dynamic=True)
BETA = HParam("beta", 0.3, "interpolation (Reptile) rate towards the "
              "adapted parameters, in (0, 1]", dynamic=True)
MEMORY_STRENGTH = HParam("memory_strength", 100.0, "weight of the "
                         "distillation / regularisation term", dynamic=True)
TEMPERATURE = HParam("temperature", 5.0, "softmax temperature of the "
                     "distillation targets", dynamic=True)
ADAPT_LR = HParam("adapt_lr", 0.001, "learning rate of test-time adaptation",
                  dynamic=True)

N_MEMORIES = HParam("n_memories", 256, "memory slots per task")
REPLAY_BATCH_SIZE = HParam("replay_batch_size", 128,
                           "samples drawn from memory per replay step")
INNER_STEPS = HParam("inner_steps", 1, "SGD steps per inner loop")
N_META = HParam("n_meta", 2, "meta iterations per batch")
ADAPT = HParam("adapt", False, "test-time adaptation on each task's memory "
               "before evaluating it")

# Reference quirks (README "Reference quirks"), reproduced by default.
GRAD_ACCUMULATION = HParam("grad_accumulation", True, "gradients zeroed once "
                           "per meta iteration, so inner steps accumulate")
FILL_ON_FIRST_WRITE = HParam("fill_on_first_write", True, "a task's first "
                             "write copies its first sample into every slot")
KL_MEAN = HParam("kl_mean", True, "distillation KL divided by batch * "
                 "nc_per_task (PyTorch KLDivLoss default)")
DROP_AT_WRAP = HParam("drop_at_wrap", True, "a batch reaching the end of a "
                      "ring buffer is cut and the pointer goes back to 0")


def check_common(hp) -> None:
  """Range checks of the shared fields a method declares."""
  from bcl_jax.methods.api import check
  if "lr" in hp:
    check(hp.lr > 0, f"lr must be > 0, got {hp.lr}")
  if "beta" in hp:
    check(0 < hp.beta <= 1, f"beta must be in (0, 1], got {hp.beta}")
  if "temperature" in hp:
    check(hp.temperature > 0, f"temperature must be > 0, got "
          f"{hp.temperature}")
  if "memory_strength" in hp:
    check(hp.memory_strength >= 0, f"memory_strength must be >= 0, got "
          f"{hp.memory_strength}")
  for k in ("n_memories", "replay_batch_size", "inner_steps", "n_meta"):
    if k in hp:
      check(int(hp[k]) == hp[k] and hp[k] >= 1,
            f"{k} must be an integer >= 1, got {hp[k]}")
