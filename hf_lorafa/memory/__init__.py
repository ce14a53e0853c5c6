"""Measuring and predicting training memory."""
