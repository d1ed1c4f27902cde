"""Checkpoints: the file format, the model card they carry, old formats and reference-project checkpoints."""
