"""``python -m lightning_losses``: the ``lightning-losses`` command."""

import sys

from lightning_losses.cli import main

if __name__ == "__main__":
    sys.exit(main())
