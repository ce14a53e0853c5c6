"""Trainer integration: arguments, the trainer mixin, callbacks, checkpoints, memory logging, savers."""
