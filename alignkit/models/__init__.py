"""Model loading, LoRA adapters, value head, and the tiny model used by tests and the demo."""
