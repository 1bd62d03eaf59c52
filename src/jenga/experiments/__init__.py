"""Experiment building blocks: models from architecture folders, methods, measured training steps."""
