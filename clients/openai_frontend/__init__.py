"""An OpenAI-compatible HTTP API (FastAPI) in front of tritonserver: /v1/completions, /v1/chat/completions,
/v1/models. Run it with `python -m clients.openai_frontend --help`."""
