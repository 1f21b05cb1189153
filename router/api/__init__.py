"""The HTTP surface: the FastAPI app and what every route shares (errors, API keys, body limits, admission,
metrics, the OpenAPI document, server-sent events, the Unicode check of request bodies)."""
