"""Adapters on disk: PEFT's LoRA format plus `hf_lorafa.json`, and the checks a loaded folder must pass."""
