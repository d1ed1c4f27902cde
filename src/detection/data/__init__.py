"""Datasets: annotation formats, dataset configs, decoding, transforms, sampling, label writers, synthetic data."""
