"""The device SDK under hostile or careless input, without a broker: every bad input is a
typed error that changes nothing, and damage found on disk is ignored or recovered from
without losing a counter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.errors import InvalidSample
from tests.helpers import close_unstarted, unstarted_client

GOOD = np.full((8, 8), 0.5, np.float32)


class _Weird:
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


@pytest.mark.parametrize("x", [[[0.1] * 8] * 7 + [[0.1] * 7], _Weird()], ids=["ragged", "array-raises"])
def test_inputs_numpy_cannot_convert_are_invalid_samples(tmp_path: Path, x: Any) -> None:
    c = unstarted_client(tmp_path, min_samples=1)
    try:
        with pytest.raises(InvalidSample, match="not an array"):
            c.add_sample(x, 1)
        assert c.store.stats().added == 0 and c.submitted == []
        with pytest.raises(InvalidSample, match="not an array"):
            c.contract.batch(x)  # what predict validates with
    finally:
        close_unstarted(c)
