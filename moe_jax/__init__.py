"""moe_jax: sparse Mixture-of-Experts Transformers in JAX and Flax NNX."""

__version__ = "0.1.0"
