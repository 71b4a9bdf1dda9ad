"""Compression algorithms as pure functions on tensors: (weight, statistics, config) -> factors or ranks.
They know nothing about hooks or Hugging Face."""
