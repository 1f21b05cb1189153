"""OpenAI's shapes: the request bodies the endpoints validate, the answers the OpenAPI document describes."""
