"""Secure aggregation (SecAgg+, Bell et al., CCS 2020) on Flower's Message API: the coordinator learns only a sum."""
