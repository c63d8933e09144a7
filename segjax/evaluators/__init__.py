"""Evaluators: reconstruction (MAE) and classification metrics, pictures."""
