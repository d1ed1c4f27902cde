"""``python -m src.detection.export``: the documented spelling of ``python -m src.detection.commands.export``."""

from .commands.export import main
from .core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
