"""Inference: predictors (PyTorch, ONNX), the threaded pipeline, video IO, tracking and drawing."""
