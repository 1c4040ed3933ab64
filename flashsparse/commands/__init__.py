"""Subcommands of the ``flashsparse`` CLI (see ``flashsparse.cli``)."""
