"""Links between devices: measured bandwidth and round-trip time, and what collectives cost over them.

Ring all-reduce and all-gather cross every hop of the ring, so the slowest hop sets their
pace; a point-to-point message pays its bytes over the pair's bandwidth plus half an RTT."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class Links:
    """Link bandwidth (Mbit/s) and round-trip time (ms) between named devices.

    Missing pairs fall back to ``default_mbps`` / ``default_rtt_ms``; lookups are
    symmetric unless the reverse direction was measured separately.
    """

    bandwidth_mbps: dict[tuple[str, str], float] = field(default_factory=dict)
    rtt_ms: dict[tuple[str, str], float] = field(default_factory=dict)
    default_mbps: float = 1000.0
    default_rtt_ms: float = 0.5

    def mbps(self, a: str, b: str) -> float:
        v = self.bandwidth_mbps.get((a, b)) or self.bandwidth_mbps.get((b, a))
        return float(v) if v else self.default_mbps

    def bytes_per_s(self, a: str, b: str) -> float:
        return self.mbps(a, b) * 1e6 / 8

    def rtt_s(self, a: str, b: str) -> float:
        v = self.rtt_ms.get((a, b)) or self.rtt_ms.get((b, a))
        return (float(v) if v else self.default_rtt_ms) / 1e3

    @classmethod
    def from_matrix(cls, matrix: Any, **defaults: float) -> "Links":
        """From ``app.devices.profile.LinkMatrix`` (``names``, ``bandwidth_mbps``, ``rtt_ms``)."""
        out = cls(**defaults)
        names = list(matrix.names)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                bw, rtt = matrix.bandwidth_mbps[i][j], matrix.rtt_ms[i][j]
                if i != j and bw:
                    out.bandwidth_mbps[(a, b)] = float(bw)
                if i != j and rtt:
                    out.rtt_ms[(a, b)] = float(rtt)
        return out

    @classmethod
    def from_pairs(cls, pairs: Mapping[str, Mapping[str, Any]], **defaults: float) -> "Links":
        """From the profile cache's ``links.json`` pairs: ``{"a->b": {"mbps", "rtt_ms"}}``."""
        out = cls(**defaults)
        for key, val in pairs.items():
            a, _, b = key.partition("->")
            if val.get("mbps"):
                out.bandwidth_mbps[(a, b)] = float(val["mbps"])
            if val.get("rtt_ms"):
                out.rtt_ms[(a, b)] = float(val["rtt_ms"])
        return out


# --------------------------------------------------------------------------- collectives


def ring_links(names: list[str]) -> list[tuple[str, str]]:
    """The hops of a ring in rank order (gloo's ring algorithms)."""
    return [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))] if len(names) > 1 else []


def slowest_hop(names: list[str], links: Links) -> tuple[str, str, float, float]:
    """(a, b, bytes/s, rtt s) of the ring's slowest hop."""
    hops = ring_links(names)
    a, b = min(hops, key=lambda h: links.bytes_per_s(*h))
    return a, b, links.bytes_per_s(a, b), max(links.rtt_s(*h) for h in hops)


def ring_allreduce_s(nbytes: float, names: list[str], links: Links) -> float:
    """Ring all-reduce: ``2(W-1)`` steps of ``nbytes/W`` each at the slowest hop."""
    w = len(names)
    if w < 2 or nbytes <= 0:
        return 0.0
    _, _, bw, rtt = slowest_hop(names, links)
    return 2 * (w - 1) * (nbytes / w / bw + rtt / 2)


def ring_allgather_s(nbytes_total: float, names: list[str], links: Links) -> float:
    """All-gather (or reduce-scatter) of a tensor of ``nbytes_total``: ``W-1`` ring steps."""
    w = len(names)
    if w < 2 or nbytes_total <= 0:
        return 0.0
    _, _, bw, rtt = slowest_hop(names, links)
    return (w - 1) * (nbytes_total / w / bw + rtt / 2)


def p2p_s(nbytes: float, a: str, b: str, links: Links) -> float:
    """One message from ``a`` to ``b``."""
    if nbytes <= 0:
        return 0.0
    return nbytes / links.bytes_per_s(a, b) + links.rtt_s(a, b) / 2


def allreduce_bytes_per_rank(nbytes: float, w: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``."""
    return 2 * (w - 1) / w * nbytes if w > 1 else 0.0
