"""The Shroud release both entry points report with ``--version``.

    __version__ -> "0.9.0"

A shared leaf (docs/DESIGN.md, "Floors"): imports nothing. The wire protocol's own version is
lib.protocol.messages.SHROUD_VERSION, reported beside it.
"""
__version__ = "0.9.0"
