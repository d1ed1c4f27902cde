"""Training: the run configuration, the epoch loop, optimisation, EMA and the feature cache."""
