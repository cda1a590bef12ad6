"""Evaluation and verification jobs."""
