"""The `hf-lorafa` command line: train (the main job), merge, push, estimate, bench, demo."""

from .commands import main

__all__ = ["main"]
