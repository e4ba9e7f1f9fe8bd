"""Generated gRPC/protobuf stubs of ``proto/*.proto`` (``python proto/generate.py``); never edit by hand."""
