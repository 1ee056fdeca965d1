"""Input data: sources (datasets.py), the grain pipeline (pipeline.py), datasets and caption
rewrites by name (registry.py)."""
