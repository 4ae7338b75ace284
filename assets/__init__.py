"""The embedded default model (default_model/), shipped as package data so `--config default`
finds it from any directory (jaxrl.config.loading.resolve_model_path)."""
