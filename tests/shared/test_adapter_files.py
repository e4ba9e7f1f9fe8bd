"""The adapter folder's file names, importable without torch, are the ones shared/adapter.py writes."""

from shared import adapter, adapter_files


def test_the_torch_free_names_are_the_adapter_modules_names():
    assert (adapter_files.ADAPTER_WEIGHTS, adapter_files.ADAPTER_CONFIG) == (
        adapter.ADAPTER_WEIGHTS,
        adapter.ADAPTER_CONFIG,
    )
