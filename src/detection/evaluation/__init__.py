"""Metrics (COCO, VOC) and their presentation (tables, CSV, plots)."""
