"""Small shared utilities: atomic file writes and CSV reading (`io`), safe checkpoint loading
(`checkpoints`), figures for loggers (`viz`)."""
