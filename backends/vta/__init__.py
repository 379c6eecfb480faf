"""VTA target (being written)."""
