"""Decoding: images priced from their headers (``probe``), then decoded on a bounded thread pool under a
memory budget (``pool``, ``budget``). Knows no HTTP."""
