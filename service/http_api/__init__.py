"""The HTTP transport, on the same event loop, dataplane and engine client as gRPC: KServe v2 over REST, the native
API as JSON (protobuf's JSON mapping) with server-sent events for streaming, an OpenAPI document and a page to
try a model (static files of this package)."""
