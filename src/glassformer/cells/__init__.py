"""The cells of a transformer, one family per module: embed, position, norm, attention, mlp, block."""
