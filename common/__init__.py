"""Shared APT core: frozen ViT backbone, prompts, composition, data and assets."""
