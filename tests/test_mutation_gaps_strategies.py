"""Strategy behaviours no test checked (helper-158's mutation audit).

Each test kills a mutant of coordinator/strategies/ that survived every unit test covering the
module; the docstrings name it (file:line at the audit's commit, and the mutation)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from coordinator.strategies import make_strategy
from edge_sdk.errors import ConfigError
from tests.helpers import SPEC, make_coordinator
from tests.test_coordinator_core import commits, upd


def test_hfedms_round_and_regroups_come_back_from_its_checkpoint() -> None:
    """hfedms.py:366 (``setattr`` in ``restore_state`` deleted): a restart forgot the round (the
    growth schedule's position) and the regroup count; and a damaged value is ignored, not taken."""
    first = make_strategy("hfedms")
    assert first.checkpoint() == {"round": 0, "regroups": 0}
    restarted = make_strategy("hfedms")
    restarted.restore_state({"round": 7, "regroups": 2})
    assert restarted.checkpoint() == {"round": 7, "regroups": 2}
    damaged = make_strategy("hfedms")
    damaged.restore_state({"round": -3, "regroups": "2"})
    assert damaged.checkpoint() == {"round": 0, "regroups": 0}


@pytest.mark.parametrize("norms", [[1.0, 3.0, 10.0], [1.0, 3.0, 5.0, 20.0], [1.0, 2.0, 4.0, 9.0, 30.0]],
                         ids=["2 known", "3 known", "4 known"])
def test_norm_clipping_bounds_an_update_by_the_median_of_the_known_norms(norms: list[float]) -> None:
    """robust.py:339 (``n % 2`` -> ``n % 3`` in the window's median): with an even count of known
    norms the bound was the upper middle value, not the mean of the two middle ones (and with
    3, 9, ... known, a mean of two); no test clipped against a median of other than an odd count."""
    unit = np.ones(SPEC.size, np.float32) / np.float32(np.sqrt(SPEC.size))
    c = make_coordinator(k=len(norms), timeout_s=None, clip_multiplier=1.0, min_known=len(norms) - 1)
    actions: list[object] = []
    for i, norm in enumerate(norms):  # every update along one direction from the model (zeros)
        actions += c.handle(upd(f"d{i}", 0, weights=(unit * np.float32(norm)).astype(np.float32)))
    (commit,) = commits(actions)
    bound = statistics.median(norms[:-1])  # the last update, far larger, is clipped to it
    expected = (sum(norms[:-1]) + bound) / len(norms)
    assert float(np.linalg.norm(commit.weights)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("strategy", "params"),
    [("hfedms", {"alpha": 0.5}), ("hfedms", {"alpha": 0.0}), ("port", {"similarity_weight": 0.5, "staleness_weight": 0.5}),
     ("port", {"similarity_weight": 0.0, "staleness_weight": 0.0})],
    ids=["hfedms alpha=0.5", "hfedms alpha=0", "port weights 0.5", "port weights 0"],
)
def test_a_parameter_inside_its_documented_range_is_accepted(strategy: str, params: dict[str, float]) -> None:
    """hfedms.py:95 (``alpha >= 0`` -> ``alpha >= 1``) and port.py:74 (``< 0`` -> ``< 1``): no
    test built the strategy with a value in [0, 1), which the mutants refused."""
    s = make_strategy(strategy, **params)
    assert {k: s.describe()[k] for k in params} == params


@pytest.mark.parametrize(
    ("strategy", "params", "match"),
    [("hfedms", {"alpha": -0.1}, "alpha"), ("port", {"similarity_weight": -0.1}, "similarity_weight"),
     ("fedasync", {"staleness": "bogus"}, "staleness policy")],
    ids=["hfedms alpha<0", "port weight<0", "fedasync unknown policy"],
)
def test_a_parameter_outside_its_range_is_a_config_error(strategy: str, params: dict[str, object], match: str) -> None:
    """fedasync.py:47 (the ``make_policy`` check deleted): an unknown staleness policy was not
    refused when the strategy was configured."""
    with pytest.raises(ConfigError, match=match):
        make_strategy(strategy, **params)
