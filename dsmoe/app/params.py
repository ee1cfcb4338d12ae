"""Click parameter types shared by the commands (light: imports only click)."""

from __future__ import annotations

import click


class Seed(click.ParamType):
    """A seed: an integer in [0, 2**64) (what ``torch.Generator.manual_seed`` takes)."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            seed = int(value)
        except (TypeError, ValueError):
            seed = None
        if seed is None or not 0 <= seed < 2**64:
            self.fail(f"seed must be an integer in [0, 2**64), got {value!r}", param, ctx)
        return seed


SEED = Seed()
