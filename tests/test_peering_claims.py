"""What a compromised ring peer can do with the claims its (signed) messages carry (helper-134).

Each test first shows the effect a claim had (the attack as a peer would send it) and then what
the receiver does now: a claim bounded by what the receiver can know, refused with a typed error
or capped and counted, the honest case unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest

from coordinator.peering.hier import HierPeerConfig, HierPeering, capped_shares, weighted_mean
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from edge_sdk.errors import ConfigError
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import PeerMsg
from tests.peering_harness import SPEC, View


def vec(value: float) -> np.ndarray:
    return np.full(SPEC.size, value, dtype=np.float32)


def msg_from(sender: str, kind: str, body: dict[str, object], weights: np.ndarray | None = None) -> PeerMsg:
    m = decode(encode(PeerMsg(sender=sender, kind=kind, body=body, weights=weights)))
    assert isinstance(m, PeerMsg)
    return m


# --------------------------------------------------------------------------- HierFAVG: samples


def hier_round(samples: dict[str, int], models: dict[str, float], config: HierPeerConfig) -> tuple[HierPeering, np.ndarray]:
    """One cloud round at ``cloud``: every edge's model and samples claim; the committed average."""
    ring = sorted(models)
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ring, config, strategy=strategy)
    strategy.gate.samples = samples["cloud"]
    assert cloud.on_version(View(weights=vec(models["cloud"])), 1.0).merged is None
    merged = None
    for n, edge in enumerate(e for e in ring if e != "cloud"):
        plan = cloud.on_message(View(weights=vec(models["cloud"])),
                                msg_from(edge, "edge", {"round": 1, "samples": samples[edge]}, vec(models[edge])), 2.0 + n)
        merged = plan.merged
    assert merged is not None
    return cloud, np.asarray(merged)


def test_an_edge_claiming_huge_samples_no_longer_makes_the_cloud_average_its_model() -> None:
    """The cloud weights each edge by the samples it claims (up to 2**63 - 1): one compromised edge
    claiming 10**12 made the average its own model (to float32), every edge committing it. No
    edge's share is above max_share (default 1/2: none outweighs all the others together)."""
    models = {"cloud": 1.0, "e1": 2.0, "e2": 3.0, "evil": 100.0}
    samples = {"cloud": 40, "e1": 50, "e2": 60, "evil": 10**12}
    _, plain = hier_round(samples, models, HierPeerConfig(kappa2=1, max_share=1.0))  # the old weighting
    np.testing.assert_allclose(plain, 100.0)  # the attacker's model, exactly
    cloud, merged = hier_round(samples, models, HierPeerConfig(kappa2=1))
    # evil gets 1/2; the others share the other half by their samples (40:50:60)
    np.testing.assert_allclose(merged, 0.5 * 100.0 + 0.5 * (40 * 1 + 50 * 2 + 60 * 3) / 150, rtol=1e-6)
    assert cloud.capped == 1 and cloud.describe()["capped"] == 1
    honest = {"cloud": 40, "e1": 50, "e2": 60, "evil": 70}  # shares below 1/2: the plain weighted mean, to the bit
    c2, m2 = hier_round(honest, models, HierPeerConfig(kappa2=1))
    assert c2.capped == 0 and "capped" not in c2.describe()
    assert m2.tobytes() == weighted_mean([vec(models[e]) for e in sorted(models)], [honest[e] for e in sorted(models)]).tobytes()


def test_capped_shares_water_fill_and_keep_the_order() -> None:
    np.testing.assert_allclose(capped_shares([10, 30], 0.5), [0.5, 0.5])
    np.testing.assert_allclose(capped_shares([1, 1, 98], 0.5), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(capped_shares([1, 2, 1000, 1000], 0.3), [0.4 / 3, 0.8 / 3, 0.3, 0.3])
    np.testing.assert_allclose(capped_shares([0, 0, 5], 0.5), [0.25, 0.25, 0.5])  # the rest: equal among zeros
    np.testing.assert_allclose(capped_shares([1, 2, 3], 0.2), [1 / 3] * 3)  # below 1/edges: equal weights
    np.testing.assert_allclose(capped_shares([0, 0], 0.5), [0.5, 0.5])
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        w = [rng.choice([0, 1, rng.randint(1, 10**6), 10**12]) for _ in range(n)]
        cap = rng.uniform(0.05, 1.0)
        s = capped_shares(w, cap)
        assert abs(float(s.sum()) - 1.0) < 1e-9
        if cap * n >= 1 and sum(w) > 0:
            assert float(s.max()) <= cap + 1e-12
            order = sorted(range(n), key=lambda i: w[i])
            assert all(s[order[i]] <= s[order[i + 1]] + 1e-12 for i in range(n - 1))


def test_max_share_is_checked() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="max_share"):
            HierPeerConfig(max_share=bad)
