"""ragtune.train: chat-data checks, LoRA SFT with TRL, merge/export."""
