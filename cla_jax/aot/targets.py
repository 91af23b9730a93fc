"""Named compile targets: TPU topologies and GPU nodes, with the datasheet facts a report needs.

A target is a chip (its HBM, peak bf16 FLOP/s, HBM and interconnect bandwidth) times a
shape: for TPU a libtpu topology name ("v5p:2x2x1") and a number of slices joined by the data
centre network; for GPU a number of GPUs per node and a number of nodes. Every figure below is
the vendor's published one (Cloud TPU system architecture pages; NVIDIA datasheets), except
where a comment says it was seen on a machine. Memory is what a program may use: for a GPU
the device memory jax reports (`nvidia-smi`'s total), for a TPU the HBM per chip.

A GPU target's compile-only devices come from a `stream_executor.GpuTargetConfigProto` in
text form, written here from the same facts (`gpu_target_config`): XLA's GPU compiler reads
the compute capability, core count, shared memory and cache sizes from it when it picks
fusions, tiles and Triton/cuDNN kernels.

    target = TARGETS["v5p-8"]          # or by_name("8xh100")
    target.chips, target.chip.hbm_bytes
"""
from __future__ import annotations

import dataclasses
import difflib
import math

GB, GIB, MIB = 10**9, 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a TPU chip, one GPU) as its vendor describes it."""
    name: str
    platform: str                 # "tpu" or "gpu"
    hbm_bytes: int                # memory a program may use
    peak_bf16_flops: float        # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    interconnect_bytes_per_s: float  # TPU ICI / GPU NVLink, per chip, one direction
    network_bytes_per_s: float    # DCN (TPU) / InfiniBand (GPU) per chip, one direction
    # GPU only: what the target config proto needs.
    compute_capability: tuple[int, int] | None = None
    sm_count: int = 0
    shared_memory_per_sm: int = 0
    shared_memory_per_block_optin: int = 0
    l2_bytes: int = 0
    clock_ghz: float = 0.0
    device_kind: str = ""         # what jax's device_kind says on the real device


# Interconnect figures are per chip and one direction: TPU ICI as the Cloud TPU pages give it
# (v5p 4800 Gbps, v6e 3584 Gbps, v4 2400 Gbps, v5e 1600 Gbps), NVLink 4 at 900 GB/s both
# directions (450 one way), NVLink 5 at 1.8 TB/s (900). Network: 4 x 200 Gbps NICs per v5p or
# v6e host of 4/8 chips is not published per chip; we take 100 Gbps (12.5 GB/s) per chip for
# TPU DCN and one 400 Gbps InfiniBand NIC per GPU (50 GB/s). These set only the roofline's
# collective term, which the report labels as an estimate.
CHIPS = {chip.name: chip for chip in (
    Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1228e9, 300e9, 12.5e9),
    Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 819e9, 200e9, 12.5e9),
    Chip("TPU v5p", "tpu", 95 * GIB, 459e12, 2765e9, 600e9, 12.5e9),
    Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1640e9, 448e9, 12.5e9),
    Chip("A100-SXM-80GB", "gpu", 81920 * MIB, 312e12, 2039e9, 300e9, 25e9,
         compute_capability=(8, 0), sm_count=108, shared_memory_per_sm=167936,
         shared_memory_per_block_optin=166912, l2_bytes=40 * MIB, clock_ghz=1.41,
         device_kind="NVIDIA A100-SXM4-80GB"),
    Chip("H100-SXM", "gpu", 81559 * MIB, 989e12, 3350e9, 450e9, 50e9,
         compute_capability=(9, 0), sm_count=132, shared_memory_per_sm=233472,
         shared_memory_per_block_optin=232448, l2_bytes=50 * MIB, clock_ghz=1.98,
         device_kind="NVIDIA H100 80GB HBM3"),
    # 143771 MiB: what nvidia-smi showed on the H200 lent here (KINDS.md, 2026-10-27).
    Chip("H200", "gpu", 143771 * MIB, 989e12, 4800e9, 450e9, 50e9,
         compute_capability=(9, 0), sm_count=132, shared_memory_per_sm=233472,
         shared_memory_per_block_optin=232448, l2_bytes=50 * MIB, clock_ghz=1.98,
         device_kind="NVIDIA H200"),
    Chip("B200", "gpu", 180 * GB, 2250e12, 8000e9, 900e9, 50e9,
         compute_capability=(10, 0), sm_count=148, shared_memory_per_sm=233472,
         shared_memory_per_block_optin=232448, l2_bytes=126 * MIB, clock_ghz=1.965,
         device_kind="NVIDIA B200"),
)}


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to compile for: a chip, its topology and how many slices (TPU) or nodes
    (GPU)."""
    name: str
    chip: Chip
    topology: str        # TPU: libtpu's topology name per slice; GPU: "1xNxG" (nodes x GPUs)
    slices: int = 1      # TPU slices over DCN, or GPU nodes over InfiniBand
    chips_per_slice: int = 1
    hosts_per_slice: int = 1
    chip_config: str | None = None  # libtpu's chip config: "megacore" (v4: one device a chip)

    @property
    def chips(self) -> int:
        return self.slices * self.chips_per_slice

    @property
    def platform(self) -> str:
        return self.chip.platform

    def describe(self) -> str:
        where = f"{self.slices} slices x " if self.platform == "tpu" and self.slices > 1 else \
            f"{self.slices} nodes x " if self.slices > 1 else ""
        unit = "chips" if self.platform == "tpu" else "GPUs"
        return f"{self.name}: {where}{self.chips_per_slice} {self.chip.name} {unit}"


def _tpu(name: str, chip: str, topology: str, slices: int = 1, chips_per_host: int = 4):
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    chips = math.prod(dims)
    return Target(name, CHIPS[chip], topology, slices, chips, max(1, chips // chips_per_host),
                  "megacore" if chip == "TPU v4" else None)


def _gpu(name: str, chip: str, gpus: int, nodes: int = 1):
    return Target(name, CHIPS[chip], f"{nodes}x1x{gpus}", nodes, gpus, 1)


# Names as users book them: Cloud TPU accelerator types count chips (v5e, v6e) or TensorCores
# (v4, v5p: two per chip), so v5p-8 is 4 chips and v5e-16 is 16.
TARGETS = {t.name: t for t in (
    _tpu("v4-8", "TPU v4", "v4:2x2x1"),
    _tpu("v4-32", "TPU v4", "v4:2x2x4"),
    _tpu("v5e-8", "TPU v5e", "v5e:2x4", chips_per_host=8),
    _tpu("v5e-16", "TPU v5e", "v5e:4x4", chips_per_host=8),
    _tpu("v5e-256", "TPU v5e", "v5e:16x16", chips_per_host=8),
    _tpu("v5p-8", "TPU v5p", "v5p:2x2x1"),
    _tpu("v5p-32", "TPU v5p", "v5p:2x2x4"),
    _tpu("v5p-256", "TPU v5p", "v5p:4x4x8"),
    _tpu("2xv5p-128", "TPU v5p", "v5p:4x4x4", slices=2),
    _tpu("v6e-8", "TPU v6e", "v6e:2x4", chips_per_host=8),
    _tpu("v6e-256", "TPU v6e", "v6e:16x16", chips_per_host=8),
    _tpu("2xv6e-256", "TPU v6e", "v6e:16x16", slices=2, chips_per_host=8),
    _gpu("1xa100", "A100-SXM-80GB", 1),
    _gpu("8xa100", "A100-SXM-80GB", 8),
    _gpu("1xh100", "H100-SXM", 1),
    _gpu("8xh100", "H100-SXM", 8),
    _gpu("4x8xh100", "H100-SXM", 8, nodes=4),
    _gpu("1xh200", "H200", 1),
    _gpu("8xh200", "H200", 8),
    _gpu("8xb200", "B200", 8),
    _gpu("2x8xb200", "B200", 8, nodes=2),
)}


def by_name(name: str) -> Target:
    """The named target, or a ValueError that lists the known ones (and the closest)."""
    if name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(name, TARGETS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown target {name!r}{hint}; known targets: {', '.join(TARGETS)}")


def compile_devices(target: Target) -> list:
    """The target's compile-only devices (jax must be running on this host's CPU, with the
    target's compile stack: see `cla_jax.aot.stack`), in the order a mesh takes them."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        kwargs = dict(num_slices=target.slices) if target.slices > 1 else {}
        if target.chip_config:
            kwargs["chip_config_name"] = target.chip_config
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                **kwargs)
    else:
        topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=gpu_target_config(target.chip))
    devices = list(topology.devices)
    if len(devices) != target.chips:
        raise RuntimeError(f"{target.name}: the compiler gave {len(devices)} devices for "
                           f"{target.topology}, not {target.chips}")
    return devices


def network_domain(device) -> int:
    """Which slice (TPU) or node (GPU) a device is in: collectives between domains cross the
    data-centre network."""
    if device.platform == "tpu":
        return getattr(device, "slice_index", 0) or 0
    return device.process_index


def gpu_target_config(chip: Chip) -> str:
    """`chip` as a stream_executor.GpuTargetConfigProto in text form (what
    `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`
    takes). Fields a datasheet does not give are CUDA's limits for every recent NVIDIA GPU."""
    if chip.platform != "gpu":
        raise ValueError(f"{chip.name} is not a GPU")
    major, minor = chip.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {chip.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {chip.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bytes_per_s)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {chip.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{chip.device_kind}"
"""
