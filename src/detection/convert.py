"""``python -m src.detection.convert``: the documented spelling of ``python -m src.detection.commands.convert``."""

from .commands.convert import main
from .core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
