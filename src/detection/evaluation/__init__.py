"""Metrics: the evaluator interface (``evaluator``), COCO and VOC scoring (``metrics``), scoring a saved predictions
file (``predictions``) and the presentation of results (``report``: tables, CSV, plots)."""
