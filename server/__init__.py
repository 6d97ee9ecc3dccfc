"""Flower ServerApp, the prompt pool and the composition service."""
