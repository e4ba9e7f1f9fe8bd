"""The coordinator: initial adapter, aggregation, round log (never imported by devices)."""
