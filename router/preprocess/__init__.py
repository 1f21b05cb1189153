"""A request turned into what a worker needs: chat templates, tool prompts, the chat plan (prompt, grammar,
output parser), and the thread pool that runs this work off the event loop."""
