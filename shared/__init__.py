"""Code both sides must agree on: config, model loading, data format, adapter wire format."""
