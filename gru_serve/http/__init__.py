"""The HTTP front end: OpenAI-compatible completions, the Open Inference Protocol over REST,
the native sessions API and the playground page, on the same engine, sessions, limits, auth,
request ids, access log and metrics as gRPC (docs/architecture.md)."""
