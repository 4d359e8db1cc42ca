"""Who the devices are: how fast they train, how they are connected, when they are on.

A :class:`DeviceProfile` is a *class* of device (an AR headset on Wi-Fi, a factory camera
on LTE-M, a sensor on NB-IoT). :meth:`DeviceProfile.instantiate` draws one concrete
device from it with a seeded ``random.Random``: its own compute speed (log-normal spread
around the class median — two phones of one model still differ), its offline windows
over the run (night-time inactivity in its own time zone, random dropouts).

Everything here is plain data plus pure functions of a seed; the simulator reads it.

Numbers are order-of-magnitude defaults, meant to be overridden per scenario:

* links — NB-IoT ≈ 220 kbit/s with ~1.5 s latency, LTE-M ≈ 1 Mbit/s with ~100 ms,
  LTE ≈ 10/30 Mbit/s up/down, Wi-Fi ≈ 20/50 Mbit/s, the coordinator's data-centre link
  1 Gbit/s;
* compute — seconds of local training per sample·epoch. The SPIN paper's example (an M1
  CPU fine-tunes YOLOv8 on 128 samples × 5 epochs in 5–6 min) is ≈ 0.5 s per sample·epoch.
  The emulated digits CNN really trains in ~1 ms; the *virtual* duration comes from here,
  so the emulator can stand for heavier models on slower devices.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edge_sdk.errors import ConfigError

DAY_S = 86_400.0

__all__ = [
    "AVAILABILITY",
    "COMPUTE",
    "COORDINATOR_LINK",
    "DAY_S",
    "LINKS",
    "PROFILES",
    "Availability",
    "ComputeProfile",
    "DeviceInstance",
    "DeviceProfile",
    "LinkProfile",
    "OfflineWindows",
    "fleet_counts",
    "measure_compute",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """A network attachment: one-way latency and bandwidth in each direction."""

    name: str
    latency_s: float
    up_bps: float
    down_bps: float

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ConfigError(f"link {self.name!r}: latency_s must be a finite number >= 0")
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise ConfigError(f"link {self.name!r}: up_bps and down_bps must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeProfile:
    """Local training speed: ``overhead_s + sample_epoch_s × samples × epochs`` for the
    median device of the class; each device scales it by a log-normal factor with
    ``spread`` as σ of the log (0 = identical devices)."""

    name: str
    sample_epoch_s: float
    overhead_s: float = 1.0
    spread: float = 0.3

    def __post_init__(self) -> None:
        if not (self.sample_epoch_s > 0 and math.isfinite(self.sample_epoch_s)):
            raise ConfigError(f"compute {self.name!r}: sample_epoch_s must be > 0")
        if not (self.overhead_s >= 0 and self.spread >= 0):
            raise ConfigError(f"compute {self.name!r}: overhead_s and spread must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Availability:
    """When a device is *off*: a daily inactivity window and random dropouts.

    ``night_start_h``/``night_hours``: every day from ``night_start_h`` (local time) for
    ``night_hours`` hours the user is asleep — no labelling, and the device does not work.
    Each device's local time is shifted by a uniform draw in ``±tz_jitter_h`` hours so the
    fleet does not switch off in lockstep. ``None`` = no night.

    Dropouts: the device alternates exponentially distributed online periods (mean
    ``dropout_every_s``) and offline periods (mean ``dropout_mean_s``). ``None`` = none.
    ``start_h`` is the wall-clock hour (coordinator time) at which a run starts.
    """

    name: str = "always"
    night_start_h: float | None = None
    night_hours: float = 8.0
    tz_jitter_h: float = 1.0
    dropout_every_s: float | None = None
    dropout_mean_s: float = 300.0
    start_h: float = 9.0

    def __post_init__(self) -> None:
        if self.night_start_h is not None and not (0 <= self.night_start_h < 24 and 0 < self.night_hours < 24):
            raise ConfigError(f"availability {self.name!r}: need 0 <= night_start_h < 24 and 0 < night_hours < 24")
        if self.dropout_every_s is not None and not (self.dropout_every_s > 0 and self.dropout_mean_s > 0):
            raise ConfigError(f"availability {self.name!r}: dropout_every_s and dropout_mean_s must be > 0")
        if not (0 <= self.start_h < 24 and self.tz_jitter_h >= 0):
            raise ConfigError(f"availability {self.name!r}: need 0 <= start_h < 24 and tz_jitter_h >= 0")

    def windows(self, horizon_s: float, rng: random.Random) -> OfflineWindows:
        """This device's offline intervals over ``[0, horizon_s)``, drawn from ``rng``."""
        intervals: list[tuple[float, float]] = []
        if self.night_start_h is not None:
            shift_h = rng.uniform(-self.tz_jitter_h, self.tz_jitter_h)
            # Seconds from run start until the first night begins (may be negative: the
            # run starts mid-night, and that partial night is an offline window too).
            first = ((self.night_start_h - self.start_h - shift_h) % 24.0) * 3600.0
            if first > (24.0 - self.night_hours) * 3600.0:
                first -= DAY_S
            t = first
            while t < horizon_s:
                intervals.append((max(t, 0.0), t + self.night_hours * 3600.0))
                t += DAY_S
        if self.dropout_every_s is not None:
            t = rng.expovariate(1.0 / self.dropout_every_s)
            while t < horizon_s:
                length = rng.expovariate(1.0 / self.dropout_mean_s)
                intervals.append((t, t + length))
                t += length + rng.expovariate(1.0 / self.dropout_every_s)
        return OfflineWindows.merge(intervals)


@dataclass(frozen=True, slots=True)
class OfflineWindows:
    """Sorted, disjoint, half-open offline intervals ``[start, end)``."""

    starts: tuple[float, ...] = ()
    ends: tuple[float, ...] = ()

    @classmethod
    def merge(cls, intervals: Iterable[tuple[float, float]]) -> OfflineWindows:
        merged: list[list[float]] = []
        for start, end in sorted(i for i in intervals if i[1] > i[0]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return cls(tuple(m[0] for m in merged), tuple(m[1] for m in merged))

    def __len__(self) -> int:
        return len(self.starts)

    def offline_at(self, t: float) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t < self.ends[i]

    def next_online(self, t: float) -> float:
        """``t`` itself when online at ``t``, else the end of the window containing it."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.ends[i]:
            return self.ends[i]
        return t

    def after_online(self, t: float, seconds: float) -> float:
        """When ``seconds`` of online time have passed after ``t`` (work pauses offline)."""
        t = self.next_online(t)
        i = bisect.bisect_right(self.starts, t)
        left = seconds
        while i < len(self.starts) and t + left > self.starts[i]:
            left -= self.starts[i] - t
            t = self.ends[i]
            i += 1
        return t + left


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """A class of device: compute, link and availability."""

    name: str
    compute: ComputeProfile
    link: LinkProfile
    availability: Availability = field(default_factory=Availability)

    def instantiate(self, device_id: str, horizon_s: float, rng: random.Random) -> DeviceInstance:
        """One concrete device of this class (speed factor and offline windows drawn)."""
        factor = math.exp(rng.gauss(0.0, self.compute.spread)) if self.compute.spread > 0 else 1.0
        return DeviceInstance(
            device_id=device_id,
            profile=self,
            speed_factor=factor,
            offline=self.availability.windows(horizon_s, rng),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceInstance:
    """One emulated device: its profile, its own slowness factor, its offline windows."""

    device_id: str
    profile: DeviceProfile
    speed_factor: float
    offline: OfflineWindows

    @property
    def link(self) -> LinkProfile:
        return self.profile.link

    def train_seconds(self, n_samples: int, epochs: int) -> float:
        """Virtual duration of one local update over ``n_samples`` for ``epochs``."""
        c = self.profile.compute
        return self.speed_factor * (c.overhead_s + c.sample_epoch_s * n_samples * epochs)


# --------------------------------------------------------------------------- catalogue

LINKS: Mapping[str, LinkProfile] = {
    "nbiot": LinkProfile(name="nbiot", latency_s=1.5, up_bps=220e3, down_bps=220e3),
    "ltem": LinkProfile(name="ltem", latency_s=0.1, up_bps=1e6, down_bps=1e6),
    "lte": LinkProfile(name="lte", latency_s=0.05, up_bps=10e6, down_bps=30e6),
    "wifi": LinkProfile(name="wifi", latency_s=0.01, up_bps=20e6, down_bps=50e6),
    "lan": LinkProfile(name="lan", latency_s=0.0005, up_bps=1e9, down_bps=1e9),
}
COORDINATOR_LINK = LinkProfile(name="datacenter", latency_s=0.001, up_bps=1e9, down_bps=1e9)

COMPUTE: Mapping[str, ComputeProfile] = {
    "laptop": ComputeProfile(name="laptop", sample_epoch_s=0.05, overhead_s=0.5, spread=0.2),
    "phone": ComputeProfile(name="phone", sample_epoch_s=0.3, overhead_s=1.0, spread=0.3),
    "headset": ComputeProfile(name="headset", sample_epoch_s=0.5, overhead_s=2.0, spread=0.3),
    "camera": ComputeProfile(name="camera", sample_epoch_s=1.0, overhead_s=2.0, spread=0.4),
    "mcu": ComputeProfile(name="mcu", sample_epoch_s=3.0, overhead_s=5.0, spread=0.5),
    # The SPIN paper's testbed (000, §V-B1): every client is the same process type on one
    # GPU server, so devices are uniform and a training's time is what the hardware takes.
    # Measured here with `python -m devices.profiles --measure` (procdigits LeNet-5, E = 5,
    # B = 16, one CPU thread, 20–240 samples × 6 repeats): 0.23 ms per sample·epoch, 8 ms
    # overhead, log-spread of repeated runs 0.07–0.14. Virtual seconds are these seconds.
    "paper": ComputeProfile(name="paper", sample_epoch_s=2.3e-4, overhead_s=0.008, spread=0.1),
}

AVAILABILITY: Mapping[str, Availability] = {
    "always": Availability(),
    "night": Availability(name="night", night_start_h=23.0, night_hours=8.0),
    "flaky": Availability(name="flaky", dropout_every_s=1800.0, dropout_mean_s=300.0),
    "night-flaky": Availability(
        name="night-flaky", night_start_h=23.0, night_hours=8.0, dropout_every_s=1800.0, dropout_mean_s=300.0
    ),
}
_ALWAYS, _NIGHT, _FLAKY = AVAILABILITY["always"], AVAILABILITY["night"], AVAILABILITY["flaky"]

PROFILES: Mapping[str, DeviceProfile] = {
    "headset": DeviceProfile(name="headset", compute=COMPUTE["headset"], link=LINKS["wifi"], availability=_NIGHT),
    "phone": DeviceProfile(name="phone", compute=COMPUTE["phone"], link=LINKS["lte"], availability=_NIGHT),
    "camera": DeviceProfile(name="camera", compute=COMPUTE["camera"], link=LINKS["ltem"], availability=_FLAKY),
    "sensor": DeviceProfile(name="sensor", compute=COMPUTE["mcu"], link=LINKS["nbiot"], availability=_FLAKY),
    "laptop": DeviceProfile(name="laptop", compute=COMPUTE["laptop"], link=LINKS["wifi"], availability=_ALWAYS),
    "paper": DeviceProfile(name="paper", compute=COMPUTE["paper"], link=LINKS["lan"], availability=_ALWAYS),
}
"""Built-in device classes; scenarios may override any field or add their own."""


def catalogue() -> str:
    """The built-in names a scenario may use, with their numbers: device profiles (``[fleet]
    mix``, ``[profiles.X]``), and the compute, link and availability presets a profile names."""
    def avail(a: Availability) -> str:
        night = f"asleep {a.night_hours:g} h from {a.night_start_h:g}:00" if a.night_start_h is not None else "no night"
        drops = (f"online ~{a.dropout_every_s:g} s, then offline ~{a.dropout_mean_s:g} s (exponential means)"
                 if a.dropout_every_s else "no dropouts")
        return f"{night}, {drops}"

    lines = ["device profiles ([fleet] mix = { NAME = share }; [profiles.NAME] overrides or adds one):"]
    lines += [f"  {p.name:<8} compute {p.compute.name:<8} link {p.link.name:<6} availability {p.availability.name}"
              for p in PROFILES.values()]
    lines.append("compute (local training: overhead_s + sample_epoch_s × samples × epochs, log-normal spread):")
    lines += [f"  {c.name:<8} sample_epoch_s {c.sample_epoch_s:g}, overhead_s {c.overhead_s:g}, spread {c.spread:g}"
              for c in COMPUTE.values()]
    lines.append("link (one-way latency, bandwidth up / down):")
    lines += [f"  {k.name:<8} {k.latency_s * 1000:g} ms, {k.up_bps / 1e6:g} / {k.down_bps / 1e6:g} Mbit/s" for k in LINKS.values()]
    lines.append("availability:")
    lines += [f"  {name:<11} {avail(a)}" for name, a in AVAILABILITY.items()]
    return "\n".join(lines)


def fleet_counts(n_devices: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split ``n_devices`` over profile names in proportion to ``mix`` (largest remainder,
    ties broken by name), so the counts always add up exactly."""
    if n_devices < 0:
        raise ConfigError("n_devices must be >= 0")
    total = float(sum(mix.values()))
    if not mix or total <= 0 or any(v < 0 for v in mix.values()):
        raise ConfigError("a profile mix needs non-negative shares with a positive sum")
    quotas = {name: n_devices * share / total for name, share in mix.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    left = n_devices - sum(counts.values())
    for name in sorted(quotas, key=lambda n: (-(quotas[n] - counts[n]), n))[:left]:
        counts[name] += 1
    return counts


def measure_compute(task_name: str = "procdigits", sizes: Sequence[int] = (20, 60, 120, 240), *, epochs: int = 5,
                    batch_size: int = 16, lr: float = 0.05, repeats: int = 6, seed: int = 0) -> ComputeProfile:
    """Time the task's real local update (one thread) and fit ``overhead + s × n × E`` by
    least squares; ``spread`` is the median σ of log-times over repeats at one size (the
    run-to-run jitter of identical devices). How the ``paper`` preset was obtained."""
    import time

    import numpy as np

    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig
    from edge_sdk.trainer import configure_threads

    configure_threads(1)
    task = get_task(task_name)
    data = task.data()
    weights = task.pretrained(seed=seed)
    rng = np.random.default_rng(seed)
    xs: list[float] = []
    ys: list[float] = []
    spreads: list[float] = []
    for n in sizes:
        times = []
        for rep in range(repeats):
            idx = rng.choice(len(data.pool.y), n, replace=False)
            cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=rep)
            t0 = time.perf_counter()
            task.local_update(weights, data.pool.x[idx], data.pool.y[idx], cfg)
            times.append(time.perf_counter() - t0)
        xs.extend([float(n * epochs)] * repeats)
        ys.extend(times)
        spreads.append(float(np.std(np.log(times))))
    slope, intercept = np.polyfit(np.array(xs), np.array(ys), 1)
    return ComputeProfile(name=f"measured-{task_name}", sample_epoch_s=float(slope), overhead_s=max(float(intercept), 0.0),
                          spread=float(np.median(spreads)))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m devices.profiles", description=(
        "Device profiles for the emulator: without options, the built-in names a scenario may use. --measure times "
        "this machine's real local update (one thread) and prints the fitted ComputeProfile, as the 'paper' preset was obtained."))
    ap.add_argument("--measure", action="store_true", help="time the task's local update and print the fitted profile")
    ap.add_argument("--task", default="procdigits", help="task to time (default: procdigits)")
    cli = ap.parse_args()
    print(measure_compute(cli.task) if cli.measure else catalogue())
