"""``python -m src.detection.evaluate``: the documented spelling of ``python -m src.detection.commands.evaluate``."""

from .commands.evaluate import main
from .core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
