"""The edge device: local LoRA training and held-out evaluation on private data."""
