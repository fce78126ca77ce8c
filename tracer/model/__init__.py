"""The replacement model: family hook tables, freezing of attention and norms, the wrapped model."""
