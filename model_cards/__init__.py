"""Jinja templates of the generated model cards, installed as the `hf_lorafa.model_cards` package data."""
