"""Input data: sources (datasets.py), the grain pipeline (pipeline.py) and Shapes (shapes.py)."""
