"""Training: tokenizers, data, and a trainer that reads top to bottom."""
