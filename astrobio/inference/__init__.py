"""Using a trained model: sampling and KV-cached generation, loading weights from checkpoints, export."""
