"""The router's side of the workers: the ZeroMQ dispatcher and its per-request queues, prefix-aware worker
choice, the CURVE authenticator, and one request's generation from frame items to detokenized text."""
