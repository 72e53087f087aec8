"""What a device can do: presets for NVIDIA GPUs, and profiles measured on this machine (``--calibrate``).

A collective over ``n`` ranks moving a buffer of ``B`` bytes takes ``latency + factor(n) * B / bandwidth``
with NCCL's bus-bandwidth factors: ``2 (n - 1) / n`` for all-reduce, ``(n - 1) / n`` for reduce-scatter,
all-gather and all-to-all, 1 for a point-to-point send. A group inside one node uses the NVLink figures,
a group that spans nodes the per-GPU network figures.

Sources of the presets (dense bf16 peaks, no sparsity):

* A100 SXM 40 / 80 GB: 312 TFLOP/s bf16, HBM2 1,555 GB/s (40 GB) and HBM2e 2,039 GB/s (80 GB), NVLink 3
  600 GB/s per GPU in both directions together (NVIDIA A100 datasheet, 2021). DGX A100 nodes have one
  200 Gb/s HDR InfiniBand adapter per GPU (DGX A100 user guide): 25 GB/s per GPU between nodes, as in
  the Megatron-LM runs (Narayanan et al. 2021, section 5).
* H100 SXM 80 GB: 989 TFLOP/s bf16, HBM3 3.35 TB/s, NVLink 4 900 GB/s (NVIDIA H100 datasheet); DGX H100:
  one 400 Gb/s NDR adapter per GPU, 50 GB/s.
* H200 SXM: the H100's compute and NVLink, 141 GB HBM3e at 4.8 TB/s (NVIDIA H200 datasheet); NDR 400 Gb/s.

Efficiency assumptions (one value per preset family, reasoned, not fitted to any table row):

* ``matmul_efficiency = 0.6``: cuBLAS sustains 70-80% of the bf16 peak on large GEMMs on A100 and H100
  (NVIDIA Deep Learning Performance Guide, "Matrix Multiplication Background": large-GEMM throughput
  curves); a training step's GEMMs have one side of h / tp and lose another 10-20% to tile and wave
  quantization (same guide), hence 0.6.
* ``attention_efficiency = 0.45``: fused (flash) attention forward + backward reaches 40-55% of the A100
  peak at head dim 64-128 and sequence 2k with a causal mask (Dao 2023, FlashAttention-2, benchmarks).
* ``memory_efficiency = 0.8``: element-wise kernels (layer norm, GELU, adds, copies) stream at about 80% of
  the HBM bandwidth (STREAM-style copies on A100/H100 reach 80-90%).
* ``link_efficiency = 0.8``: NCCL bus bandwidth is 75-85% of the link rate: nccl-tests all-reduce on
  DGX A100 reaches about 230 of 300 GB/s one-way NVLink, and 20-23 of 25 GB/s across HDR nodes.
* latencies: 10 us per NCCL collective inside a node, 20 us across nodes (nccl-tests small-message times).
* ``usable_memory_fraction = 0.92``: the CUDA context, NCCL buffers and allocator fragmentation take a few
  GiB of a GPU (about 6 of 80 GB is a common observation).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


@dataclass(frozen=True)
class Link:
    """One kind of connection: achieved bus bandwidth (bytes/s) and latency (s) per collective."""

    bandwidth: float
    latency: float
    measured: tuple[tuple[str, float, float], ...] = ()
    """Measured ``(op, bandwidth, latency)`` where a backend differs between collectives (gloo)."""

    @property
    def per_op(self) -> dict[str, tuple[float, float]]:
        return {op: (bw, lat) for op, bw, lat in self.measured}

    def time(self, op: str, nbytes: float, n: int, latency: float = 0.0) -> float:
        """Seconds for collective ``op`` over ``n`` ranks of a ``nbytes`` buffer (0 for one rank); a
        ``latency`` larger than the link's replaces it (a wait measured under load)."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        bw, lat = next(((b, la) for o, b, la in self.measured if o == op), (self.bandwidth, self.latency))
        factor = {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(op, (n - 1) / n)
        return max(lat, latency) + factor * nbytes / bw


@dataclass(frozen=True)
class DeviceSpec:
    """A device (one per rank) and the links between ranks."""

    name: str
    peak_flops: float
    """Dense peak of the training dtype, FLOP/s (bf16 on GPUs; fp32 measured on a CPU)."""
    memory_bytes: float
    memory_bandwidth: float
    intra_node: Link
    inter_node: Link
    matmul_efficiency: float = 0.6
    attention_efficiency: float = 0.45
    memory_efficiency: float = 0.8
    usable_memory_fraction: float = 0.92
    op_overhead: float = 0.0
    """Seconds of host time per tensor op (dispatch, autograd); 0 on GPUs, whose launches are asynchronous
    and hide behind kernels that run for milliseconds at training sizes."""
    compute_slots: int | None = None
    """How many ranks can compute at full speed at once (CPU cores); ``None``: each rank has its own device."""
    comm_overlap: bool = True
    """Whether collectives run beside compute (NCCL on its own copy engines and SMs). On a CPU, gloo's
    transfers and sums take the same cores as the backward they were meant to hide behind: ``False``."""
    optimizer_bandwidth: float | None = None
    """Bytes/s of AdamW's step at 32 bytes per element (measured by ``--calibrate``); ``None``: the
    element-wise rate, ``memory_bandwidth * memory_efficiency`` (a GPU's fused step streams)."""
    step_overhead: float = 0.0
    """Seconds the framework adds to every step (Lightning's loop, the strategy), measured on a tiny model
    by ``--calibrate``; 0 for presets (at GPU training sizes it hides behind the kernels)."""
    action_overhead: float = 0.0
    """Seconds the pipeline runner adds per micro-batch pass (forward or backward) of a stage."""
    oversubscribed: Link | None = None
    """Collectives measured with more ranks than ``compute_slots`` (twice as many) over all of them: a rank
    that waits to be scheduled delays every collective it is in. Used for worlds larger than the slots."""
    oversubscribed_pairs: Link | None = None
    """The same world's collectives in groups of two, every pair at once (tp or dp groups of 2)."""
    interleaved: tuple[tuple[str, float, float], ...] = ()
    """``(op, compute seconds between calls, seconds per call)`` of small collectives in pairs that each
    rank issues between stretches of its own compute, as tp and pp do, one rank per slot: the partner
    that arrives later and the wake-up of a rank asleep in its receive cost more than calls back to
    back (on this 2-core machine about 1-2 ms against 0.5 ms). Measured for ``all_reduce`` and ``p2p``
    after two stretch lengths; see :meth:`wait`."""
    oversubscribed_interleaved: tuple[tuple[str, float, float], ...] = ()
    """The same with twice as many ranks as slots, all pairs at once: a rank whose partner is
    descheduled waits for its turn on a core, longer the longer the stretches (here about 1 ms a call
    after 1 ms of compute, 2.5 ms after 4 ms)."""
    source: str = "preset"

    def wait(self, op: str, compute: float, oversubscribed: bool = False) -> float:
        """Latency of one ``op`` issued after ``compute`` seconds of compute (:attr:`interleaved`, or
        :attr:`oversubscribed_interleaved`): linear between the two measured stretches, the nearest
        one's outside them (0: not measured). Collectives other than ``p2p`` use the all-reduce's."""
        kind = "p2p" if op == "p2p" else "all_reduce"
        table = self.oversubscribed_interleaved if oversubscribed else self.interleaved
        points = sorted((c, w) for o, c, w in table if o == kind)
        if not points:
            return 0.0
        (c0, w0), (c1, w1) = points[0], points[-1]
        if compute <= c0 or c1 <= c0:
            return w0 if compute <= c0 else w1
        return w1 if compute >= c1 else w0 + (w1 - w0) * (compute - c0) / (c1 - c0)

    @property
    def matmul_flops(self) -> float:
        return self.peak_flops * self.matmul_efficiency

    @property
    def usable_memory(self) -> float:
        return self.memory_bytes * self.usable_memory_fraction

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("intra_node", "inter_node", "oversubscribed", "oversubscribed_pairs"):
            link = getattr(self, key)
            if link is not None:
                data[key] = {"bandwidth": link.bandwidth, "latency": link.latency, "per_op": link.per_op}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceSpec:
        """A profile from its JSON (``per_op``: ``{op: [bandwidth, latency]}``)."""
        links = {}
        for key in ("intra_node", "inter_node", "oversubscribed", "oversubscribed_pairs"):
            raw = data.get(key)
            if raw is None:
                continue
            measured = tuple((op, float(v[0]), float(v[1])) for op, v in raw.get("per_op", {}).items())
            links[key] = Link(float(raw["bandwidth"]), float(raw["latency"]), measured)
        tables = {
            key: tuple((str(op), float(c), float(w)) for op, c, w in data.get(key, ()))
            for key in ("interleaved", "oversubscribed_interleaved")
        }
        return cls(**{**data, **links, **tables})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


GB = 1e9
_NVLINK3 = Link(bandwidth=0.8 * 300 * GB, latency=10e-6)  # 600 GB/s bidirectional: 300 one way
_NVLINK4 = Link(bandwidth=0.8 * 450 * GB, latency=10e-6)
_HDR = Link(bandwidth=0.8 * 25 * GB, latency=20e-6)  # 200 Gb/s per GPU
_NDR = Link(bandwidth=0.8 * 50 * GB, latency=20e-6)  # 400 Gb/s per GPU

PRESETS: dict[str, DeviceSpec] = {
    "a100-40gb": DeviceSpec("a100-40gb", 312e12, 40 * GB, 1555 * GB, _NVLINK3, _HDR),
    "a100-80gb": DeviceSpec("a100-80gb", 312e12, 80 * GB, 2039 * GB, _NVLINK3, _HDR),
    "h100-80gb": DeviceSpec("h100-80gb", 989e12, 80 * GB, 3350 * GB, _NVLINK4, _NDR),
    "h200": DeviceSpec("h200", 989e12, 141 * GB, 4800 * GB, _NVLINK4, _NDR),
}
"""GPU presets by name (see the module docstring for sources)."""


def get_device(device: str | Path | DeviceSpec) -> DeviceSpec:
    """A preset by name, a profile saved by ``--calibrate`` (a ``.json`` path), or a spec as is."""
    if isinstance(device, DeviceSpec):
        return device
    key = str(device)
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    path = Path(key)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"device profile {key!r} does not exist; run `lightning-par plan --calibrate` first."
            )
        return DeviceSpec.from_json(json.loads(path.read_text()))
    raise ValueError(
        f"device={key!r} is not known; valid presets: {sorted(PRESETS)}, or a profile .json path."
    )


def with_memory(device: DeviceSpec, memory_bytes: float) -> DeviceSpec:
    """The same device with another memory size (what-if planning)."""
    return replace(device, memory_bytes=memory_bytes)


def _median_link(links: list[Link]) -> Link:
    per_op = [link.per_op for link in links]
    return Link(
        bandwidth=statistics.median(link.bandwidth for link in links),
        latency=statistics.median(link.latency for link in links),
        measured=tuple(
            (op, statistics.median(p[op][0] for p in per_op), statistics.median(p[op][1] for p in per_op))
            for op in per_op[0]
        ),
    )


def merge_profiles(profiles: list[DeviceSpec]) -> DeviceSpec:
    """One profile from several calibrations of one machine: the median of every measured figure.

    A machine whose speed drifts from minute to minute (this project's 2-core test machine: AdamW
    5.6-14.5 GB/s and the all-reduce latency 0.9-2.2 ms over nine calibrations in 18 minutes) is
    described best by calibrations spread over the same minutes as the runs it predicts.
    """
    if not profiles:
        raise ValueError("profiles=[] is not valid: merge at least one calibrated profile.")
    merged: dict[str, Any] = {}
    for field in fields(profiles[0]):
        values = [getattr(p, field.name) for p in profiles]
        if all(isinstance(v, Link) for v in values):
            merged[field.name] = _median_link(values)
        elif all(isinstance(v, float) for v in values):
            merged[field.name] = statistics.median(values)
    # Interleaved waits: the median of each (op, stretch) over the profiles that measured it.
    for key in ("interleaved", "oversubscribed_interleaved"):
        points: dict[tuple[str, float], list[float]] = {}
        for p in profiles:
            for op, compute, wait in getattr(p, key):
                points.setdefault((op, compute), []).append(wait)
        merged[key] = tuple((op, c, statistics.median(w)) for (op, c), w in points.items())
    return replace(profiles[0], **merged)
