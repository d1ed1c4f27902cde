"""What every other part stands on: errors, paths, file IO, YAML, parser conventions, device and precision policy."""
