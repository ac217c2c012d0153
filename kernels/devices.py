"""What a GPU can hold, for choosing kernel configs before anything compiles.

A Target is a compile target and its limits: NVIDIA's compute capability (sm_75 ... sm_120) or
AMD's gfx name (gfx90a, gfx942), and the shared memory one block may use. Triton compiles for any
target on any machine (bench/compile_report.py), so the same Target drives the runtime's config
choice (flash_launch.py) and the portability report that checks it without the card.

ROCm's PyTorch presents AMD GPUs as device type "cuda"; torch.version.hip tells them apart.
"""
import functools
from dataclasses import dataclass

import torch

# Shared memory one block may use (the opt-in maximum), in bytes: NVIDIA's CUDA C programming
# guide (compute capabilities table) and AMD's LDS size per workgroup (CDNA2/3 ISA guides).
SHARED_MEMORY = {
    75: 64 * 1024,                      # Turing: T4, RTX 20xx
    80: 163 * 1024,                     # A100, A30
    86: 99 * 1024, 89: 99 * 1024,       # A10, A40, RTX 30xx; L4, L40S, RTX 40xx
    87: 163 * 1024,                     # Jetson Orin
    90: 227 * 1024,                     # H100, H200
    100: 227 * 1024, 103: 227 * 1024,   # B200, GB200, B300
    120: 99 * 1024,                     # RTX 50xx, RTX PRO 6000 Blackwell
    "gfx90a": 64 * 1024,                # MI200 (MI210, MI250)
    "gfx942": 64 * 1024,                # MI300X, MI300A, MI325X
    "gfx950": 160 * 1024,               # MI350X, MI355X
}


@dataclass(frozen=True)
class Target:
    """A compile target: backend "cuda" (NVIDIA) or "hip" (AMD), its arch (75, 80, ... or
    "gfx942"), threads per warp, and the shared memory one block may use, in bytes."""
    backend: str
    arch: object
    warp_size: int
    shared_memory: int
    name: str = ""

    @property
    def label(self):
        """"sm_86" or "gfx942"."""
        return f"sm_{self.arch}" if self.backend == "cuda" else str(self.arch)

    def describe(self):
        """The GPU's name and arch, for messages."""
        return f"{self.name} ({self.label})" if self.name else self.label


def target(arch):
    """The Target of a known arch: an int compute capability (75 for 7.5) or a gfx name."""
    if arch not in SHARED_MEMORY:
        raise ValueError(f"unknown arch {arch!r}: known are {', '.join(map(str, SHARED_MEMORY))}")
    hip = isinstance(arch, str)
    return Target("hip" if hip else "cuda", arch, 64 if hip else 32, SHARED_MEMORY[arch])


# NVIDIA and AMD targets the project is compiled for in CI (bench/compile_report.py
# --portability): every architecture its users have, oldest first.
PORTABILITY = (75, 80, 86, 89, 90, 100, 120, "gfx90a", "gfx942")


def platform():
    """"rocm" for ROCm's PyTorch, "cuda" with a CUDA GPU, else "cpu"."""
    if torch.version.hip is not None:
        return "rocm"
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def _target_of(index):
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if torch.version.hip is not None:
        arch = getattr(props, "gcnArchName", "").split(":")[0] or "gfx"
        return Target("hip", arch, getattr(props, "warp_size", 64),
                      shared or SHARED_MEMORY.get(arch, 64 * 1024), props.name)
    arch = props.major * 10 + props.minor
    # The device's own figure; the table's where this torch does not report it; else CUDA's
    # 48 KB that every block may use without opting in.
    shared = shared or SHARED_MEMORY.get(arch, 48 * 1024)
    return Target("cuda", arch, getattr(props, "warp_size", 32), shared, props.name)


def target_of(device):
    """The Target of a CUDA (or ROCm) device, read once per process from the device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _target_of(index)
