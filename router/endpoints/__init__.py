"""One module per OpenAI endpoint: chat completions, completions, embeddings and the Responses API (HTTP and
WebSocket); each turns a validated request into a generation and formats its answer."""
