"""`ConfigError`: the one error of `flows.config`, one line per problem.

A bad config, site name or argument raises it; the CLI prints its lines and exits with
status 2 before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(Exception):
    """The config, a site name or an argument is invalid. `problems` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
