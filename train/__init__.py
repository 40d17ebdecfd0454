"""ragtune.train: chat-data checks, LoRA SFT with TRL, merge (GGUF export lives in ragtune.export)."""
