"""What every front shares, whatever carries the request (REST or gRPC): who gets served, the Open
Inference Protocol's models and metadata, and its input tensors as images. No web framework here."""
