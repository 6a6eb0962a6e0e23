"""The HTTP layer beneath both APIs: admission and readiness, the API key, errors, request bodies,
middleware and connection limits."""
