"""Training: optimizer, metrics, checkpoints and the trainer loop."""
