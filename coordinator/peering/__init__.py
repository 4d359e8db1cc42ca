"""Coordinator ↔ coordinator model exchange (pluggable, sans-IO): ``none`` by default."""

from coordinator.peering.base import Peering, PeerPlan, PeerSend

__all__ = ["PeerPlan", "PeerSend", "Peering"]
