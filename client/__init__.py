"""Flower ClientApp: each source trains its own prompt on its private shard."""
