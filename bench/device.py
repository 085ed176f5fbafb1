"""Which machine a benchmark runs on, and the peak figures its throughput is compared with.

Peaks are dense bf16 tensor-core FLOP/s and HBM bandwidth from the vendors' data sheets; a GPU
missing from :data:`PEAKS` gets TFLOP/s and GB/s but no percentage.
"""
from __future__ import annotations

import dataclasses
import os
import platform

import torch


@dataclasses.dataclass(frozen=True)
class Peak:
    tflops: float  # dense bf16, TFLOP/s
    tbps: float  # HBM bandwidth, TB/s


# Matched in order against torch.cuda.get_device_name() (first substring that occurs wins).
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H200", Peak(989.0, 4.8)),
    ("H100 PCIe", Peak(756.0, 2.0)),
    ("H100", Peak(989.0, 3.35)),  # SXM (HBM3)
    ("A100", Peak(312.0, 2.0)),
)


def peak_for(name: str) -> Peak | None:
    """The peak figures of the GPU called ``name``, or None if it is not in :data:`PEAKS`."""
    for key, peak in PEAKS:
        if key in name:
            return peak
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A short human name: the GPU's name, or the CPU model with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
