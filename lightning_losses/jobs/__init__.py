"""The main jobs behind the ``lightning-losses`` subcommands (one module per family).

Only :mod:`lightning_losses.cli` imports them; they are built on :mod:`lightning_losses.demos` and the ready
modules, as the examples under ``examples/`` are.
"""
