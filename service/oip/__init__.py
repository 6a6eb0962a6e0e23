"""The Open Inference Protocol (KServe V2) over REST: routes, model repository, wire format, schemas."""
