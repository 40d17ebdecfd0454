"""ragtune.eval: base vs fine-tuned vs RAG vs fine-tuned+RAG on held-out questions."""
