"""``python -m src.detection.analyze``: the documented spelling of ``python -m src.detection.commands.analyze``."""

from .commands.analyze import main
from .core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
