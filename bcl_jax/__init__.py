"""bcl_jax: Bilevel Continual Learning and its baselines in functional JAX."""

__version__ = "0.1.0"
