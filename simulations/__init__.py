"""Run configs, demo data, the main job and benchmarks (never imported by the product)."""
