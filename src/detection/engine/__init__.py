"""Training: the run configuration (``config``), the run itself (``training``: set-up, epochs, checkpoints, resume),
the epoch and evaluation loops (``loop``), scoring a checkpoint (``evaluation``) and the feature cache."""
