"""The file names of a PEFT adapter folder (what an adapter release holds), importable without torch."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
