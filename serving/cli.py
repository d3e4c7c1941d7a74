"""Serving subcommands of the `rayquant` CLI (registered by cluster.cli)."""

from __future__ import annotations

SERVING_COMMANDS: dict = {}


def add_serving_commands(sub) -> None:
    """No serving commands yet."""
