"""The soak's options and fixed names: what runs, how much, which faults, the traffic mix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = "visionroute"
FAULTS = ("postgres", "ingress", "search")  # the default rotation
KNOWN_FAULTS = (*FAULTS, "vlm")  # vlm: only with the VLM tier (--vlm; evals/benchmarks/soak_vlm.py)
REPLICA_OF_FAULT = {"ingress": "Ingress", "search": "search"}
METERED_TENANT = "soak-metered"
BUDGET_NAME = "soak-metered"
BUDGET_WINDOW_S = 366 * 86400  # one window for the whole run (windows are epoch-aligned)
GROWTH_LIMIT = 0.10
# (operation, face, weight): the traffic mix; a review round is a claim and its label
MIX = (
    ("analyze", "http", 3),
    ("analyze", "grpc", 3),
    ("batch", "http", 1),
    ("search", "http", 1),
    ("search", "grpc", 1),
    ("index", "http", 0.5),
    ("index", "grpc", 0.5),
    ("review", "http", 1),
    ("review", "grpc", 1),
)
BATCH_IMAGES = 4


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 30.0
    rate_per_s: float = 4.0  # logical calls per second, all clients together
    clients: int = 4
    faults: tuple[str, ...] = FAULTS
    fault_every_s: float = 60.0
    ingress_replicas: int = 2
    search_replicas: int = 2
    budget_cap_units: float = 20.0
    seed: int = 0
    vlm: bool = False  # a VLM tier on a real vLLM server the soak starts (soak_vlm.py)
    # connections per store pool, all opened at start (state.pool_min == pool_max: a growth
    # in connections is then a leak, not a pool filling); 0: the shipped pools (1 to 4, on demand)
    pool_size: int = 4

    def __post_init__(self) -> None:
        from visionroute.errors import ConfigError

        if not self.minutes > 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes!r}", field="minutes")
        if not self.rate_per_s > 0 or self.clients < 1:
            raise ConfigError(
                f"rate must be > 0 and clients >= 1, got {self.rate_per_s}, {self.clients}", field="rate"
            )
        unknown = sorted(set(self.faults) - set(KNOWN_FAULTS))
        if unknown:
            raise ConfigError(
                f"unknown faults {unknown}; expected some of {list(KNOWN_FAULTS)}", field="faults"
            )
        if "vlm" in self.faults and not self.vlm:
            raise ConfigError("the vlm fault needs the VLM tier (vlm=True, --vlm)", field="faults")
        if not 0 <= self.pool_size <= 64:
            raise ConfigError(f"pool_size must be 0 to 64, got {self.pool_size!r}", field="pool_size")
        if "ingress" in self.faults and self.ingress_replicas < 2:
            raise ConfigError(
                "killing an ingress replica needs ingress_replicas >= 2", field="ingress_replicas"
            )

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return min(60.0, max(10.0, 0.1 * self.duration_s))

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault): spread evenly between the warm-up and a quiet tail,
        the kinds in turn, at least one of each."""
        if not self.faults:
            return []
        tail = max(10.0, 0.05 * self.duration_s)
        window = self.duration_s - self.warmup_s - tail
        count = max(len(self.faults), int(window // self.fault_every_s))
        return [
            (self.warmup_s + window * (i + 0.5) / count, self.faults[i % len(self.faults)])
            for i in range(count)
        ]
