"""Training: optimizer, the pure train step, checkpointing with exact resume, metrics and the loop."""
