"""Training: AdamW and the schedule (optim), checkpoints (checkpoint), the loop (trainer)."""
