"""Pieces of scripts/benchmark_training.py (models and modes, checks, memory, report tables)."""
