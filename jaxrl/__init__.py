"""jaxrl: JAX-native RL post-training for LLM reasoning (GRPO, DAPO, forking tokens)."""

__version__ = "0.1.0"
