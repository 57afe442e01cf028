"""What the verbs share: one error line instead of a traceback, and the ranges of their numbers."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

# Documents, tokens, beams, threads, requests: a count below one is a usage error (exit 2), not a traceback.
COUNT = click.IntRange(min=1)
# Speeds and time spans that must be above zero.
POSITIVE = click.FloatRange(min=0, min_open=True)


def fail(e: Exception) -> NoReturn:
    """Print ``error: ...`` on stderr and exit with status 2."""
    click.echo(f"error: {e}", err=True)
    sys.exit(2)
