"""`dsv3 serve`: the DeepSeek/OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn)."""
