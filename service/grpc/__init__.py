"""The Open Inference Protocol (KServe V2) over gRPC, ``inference.GRPCInferenceService``, with Triton's
model repository extension: the same models, batchers, bounds, API key and metrics as the REST side,
sharing with it everything below the HTTP layer (service/fronts/)."""
