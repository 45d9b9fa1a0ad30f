"""Storage: safetensors checkpoints (atomic, checksummed), the compressed pruned-model format, initial weights."""
