"""Masks: composing a target's mask from its cells and its image, and exporting masks."""
