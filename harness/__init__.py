"""harness: the SFT core of the forgetting toolkit: config, model loading, data and formats, the loop, the CLI."""

__version__ = "0.1.0"
