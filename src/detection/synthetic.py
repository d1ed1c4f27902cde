"""``python -m src.detection.synthetic``: the documented spelling of ``python -m src.detection.commands.synthetic``."""

from .commands.synthetic import main
from .core.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
