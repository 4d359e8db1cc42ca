"""A selecting strategy's draws, resumed across a restart.

The core hands every ``plan`` one ``random.Random(seed)``, built again at each start: a restarted
coordinator drew its next round as the run's *first* one (HFedMS's groups, FedAvg's participants:
helper-175). :class:`Draws` takes over that generator at the first plan (a copy of its state, so an
uninterrupted run draws exactly what it drew before: the core uses it for nothing else) and keeps
its state in the strategy's checkpoint, so a restart draws on from where the commit left it.

The state is Mersenne Twister's 624 words and index as little-endian uint32 in base64 (3,336
characters; ``gauss_next`` beside it). A state that does not decode, or that ``setstate`` refuses,
is refused: :meth:`Draws.restore` says False and the draws start from the core's generator, as before.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
from typing import Any

import numpy as np

__all__ = ["Draws"]

_WORDS = 625
"""624 state words and the index into them (``random.Random.getstate()[1]``)."""
_TEXT_CHARS = 4 * ((4 * _WORDS + 2) // 3)


class Draws:
    """The generator a strategy draws from: the core's, copied at the first plan, or one restored."""

    def __init__(self) -> None:
        self._rng: random.Random | None = None

    def rng(self, core_rng: random.Random) -> random.Random:
        """The generator to draw from (``core_rng``'s state copied the first time, when none was restored)."""
        if self._rng is None:
            self._rng = random.Random()
            self._rng.setstate(core_rng.getstate())
        return self._rng

    def checkpoint(self) -> dict[str, Any] | None:
        """JSON-able state, or None before the first draw (a restart then starts from the core's, as this run did)."""
        if self._rng is None:
            return None
        version, words, gauss = self._rng.getstate()
        return {"mt": base64.b64encode(np.asarray(words, dtype="<u4").tobytes()).decode("ascii"),
                **({"gauss": gauss} if gauss is not None else {}), **({"v": version} if version != 3 else {})}

    def restore(self, state: object) -> bool:
        """Take a checkpointed state; False (nothing changed) when it is not one."""
        if not isinstance(state, dict):
            return False
        text, gauss, version = state.get("mt"), state.get("gauss"), state.get("v", 3)
        if not isinstance(text, str) or len(text) != _TEXT_CHARS or version != 3 or isinstance(version, bool):
            return False
        if gauss is not None and not (isinstance(gauss, float) and math.isfinite(gauss)):
            return False
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(raw) != 4 * _WORDS:
            return False
        words = tuple(int(w) for w in np.frombuffer(raw, dtype="<u4"))
        if words[-1] > _WORDS - 1 or not any(words[:-1]):
            return False
        rng = random.Random()
        try:
            rng.setstate((3, words, gauss))
        except (ValueError, TypeError):
            return False
        self._rng = rng
        return True
