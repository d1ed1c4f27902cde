"""Annotation readers, one module per file format (voc, coco, yolo) plus what they share (common)."""
