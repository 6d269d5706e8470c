"""Datasets: Musubi dataset.toml, buckets, items and the dataset check."""
