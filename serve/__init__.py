"""ragtune.serve: answer with or without retrieved context (ask, chat, OpenAI-compatible server)."""
