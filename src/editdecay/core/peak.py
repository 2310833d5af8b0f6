"""Measured peak memory of a block of work, on the CPU or a CUDA device: what the memory plan is checked against.

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only; the caching
  allocator's reserve and the CUDA context are not counted, as the plan does not count them).
- CPU: the growth of the process's resident set: the kernel's high-water mark (VmHWM in /proc/self/status),
  reset at the start of the block by writing "5" to /proc/self/clear_refs (Linux >= 4.0), minus the resident
  size at the start. glibc keeps freed memory in its heap, which later allocations reuse without growing
  the resident set, so the heap is trimmed (`malloc_trim`) first; otherwise memory freed before the block
  would hide part of the block's growth.

`PeakMemory.extra` is the peak minus what was allocated (CUDA) or resident (CPU) at the start: the block's
own transient memory. Tensors that were alive at the start (model weights) are in `start` on CUDA and in
neither figure on the CPU; callers add the weights they know of (`resident`) to compare total peaks.
"""

from __future__ import annotations

import ctypes
import gc
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(m.group(1)) * 1024


def cpu_peak_supported() -> bool:
    """True where the resident high-water mark can be read and reset (Linux with a writable clear_refs)."""
    try:
        _status_bytes("VmHWM")
        _CLEAR_REFS.write_text("5")
        return True
    except (OSError, RuntimeError):
        return False


_M_MMAP_THRESHOLD = -3          # mallopt parameter (malloc.h)
_MMAP_THRESHOLD = 128 * 1024    # glibc's initial value


def _trim_heap() -> None:
    """Return freed heap memory to the kernel and fix glibc's mmap threshold at its initial 128 KiB.

    glibc raises the threshold (up to 32 MiB) each time a large block is freed, after which blocks of that
    size come from the heap and stay resident when freed: then the resident size no longer follows the
    live tensors and the same work measures tens of MiB apart from run to run. A fixed threshold gives every
    tensor above 128 KiB its own mapping, released on free (this changes the process's allocator setting).
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


@dataclass
class PeakMemory:
    """Peak memory of the work inside `with PeakMemory(device) as m:`; read `m.extra` (bytes) afterwards."""

    device: str | torch.device = "cpu"
    start: int = 0          # CUDA: bytes allocated at the start; CPU: resident bytes at the start
    peak: int = 0           # CUDA: max allocated; CPU: resident high-water mark

    def __enter__(self) -> "PeakMemory":
        dev = torch.device(self.device)
        self._cuda = dev.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.start = torch.cuda.memory_allocated(dev)
        else:
            _trim_heap()
            _CLEAR_REFS.write_text("5")            # the high-water mark restarts at the current resident size
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            torch.cuda.synchronize(torch.device(self.device))
            self.peak = torch.cuda.max_memory_allocated(torch.device(self.device))
        else:
            self.peak = _status_bytes("VmHWM")

    @property
    def extra(self) -> int:
        """Peak bytes above the start of the block (>= 0)."""
        return max(0, self.peak - self.start)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["PeakMemory", "cpu_peak_supported", "tensor_bytes"]
