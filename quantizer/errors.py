"""The one exception type user-facing code raises for bad input."""


class ConfigError(ValueError):
    """Bad user input: the message names the problem and how to fix it."""
