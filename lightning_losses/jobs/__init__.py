"""The main jobs behind the ``lightning-losses`` subcommands (one module per family)."""
