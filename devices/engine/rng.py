"""A device core's ``random.Random``, seeded on its first draw.

A ``random.Random`` holds the Mersenne Twister's 2.5 KB of state from the moment it is
built. An emulated fleet gives each device core its own, but a core draws only once it has
samples (a request's jitter, a nonce): at 2 labels per hour over 30 minutes about a third
of 100,000 devices never label. The simulator gives those this instead: the same draws
(seeding is a pure function of the seed), built only if one is ever asked for.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["SeededOnUse"]


class SeededOnUse:
    """Draws as ``random.Random(f"{prefix}{index}")`` would, building it on the first draw.

    ``random`` and ``randrange`` (what :class:`edge_sdk.core.device.DeviceCore` draws with) are
    methods here; any other attribute is the built generator's."""

    __slots__ = ("_index", "_prefix", "_rng")

    def __init__(self, prefix: str, index: int) -> None:
        # The seed's parts, not the joined string: the prefix is one object shared by the fleet.
        self._prefix = prefix
        self._index = index
        self._rng: random.Random | None = None

    @property
    def seeded(self) -> bool:
        """Whether the generator was built (something drew from it)."""
        return self._rng is not None

    def generator(self) -> random.Random:
        rng = self._rng
        if rng is None:
            rng = self._rng = random.Random(f"{self._prefix}{self._index}")
        return rng

    def random(self) -> float:
        return self.generator().random()

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        return self.generator().randrange(start, stop, step)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # an unset slot (a copy being built): never build the generator for it
            raise AttributeError(name)
        return getattr(self.generator(), name)
