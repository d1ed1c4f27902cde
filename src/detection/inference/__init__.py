"""Inference: predictors (PyTorch, ONNX), the threaded pipeline, the image and video command bodies (``images``,
``video``), tracking and drawing."""
