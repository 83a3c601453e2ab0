"""The Open Inference Protocol gRPC service definition (``inference.proto``) and its generated Python modules."""
