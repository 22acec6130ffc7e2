"""The gRPC transport: the native Translator servicer, the one error-to-status table, and the server."""
