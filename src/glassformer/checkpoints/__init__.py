"""Checkpoints: glassformer's own format (config.json + model.safetensors) and converters."""
