"""One module per training stage, plus the shared loop pieces (checkpoints, tracking)."""
