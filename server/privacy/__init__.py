"""Client-level differential privacy of the coordinator: the Gaussian mechanism and its accountant."""
