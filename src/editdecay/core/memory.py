"""Memory-aware batching: how many items (requests, prompts, key columns) one batch of a stage holds.

The rule: a stage whose work grows with the number of edits n (E2 keys, E3 targets,
E4/E5 solves and AlphaEdit's C_p, E6 metrics) runs in batches whose size depends on
the device's memory and the model's shape, never on n. So 10,000 edits need no
more device memory than 100; what grows with n is O(n) bookkeeping on the host
(the requests, their keys (d_k, n) and targets (d, n) as float32 CPU tensors).

Batch size of a stage (`plan_batch_size`), in order of precedence:
1. given explicitly (a function argument or config field): used as is, capped at n;
2. on a CUDA device: (fraction * free bytes - reserve) // bytes_per_item, with the free
   bytes from `torch.cuda.mem_get_info`, clamped to [1, max_size];
3. on any other device (CPU): a fixed default per stage (the sizes used before
   batching became memory-aware, so CPU results are unchanged).

`bytes_per_item` are estimates from the model's shape (`ModelShape`), deliberately
generous. When a batch still runs out of memory, `run_batched` halves it and redoes
that batch; at batch size 1 (or with halving not allowed) it raises
`DeviceMemoryError`, which names the stage, the batch size and the memory asked for.

`record_batches()` records the largest batch each stage built inside a `with` block and
its estimated memory (tests check that 10x more edits do not build larger batches).
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from editdecay.core.arch import ConfigSizes, unwrap_peft
from editdecay.core.errors import EditDecayError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MEMORY_FRACTION = 0.6          # share of the free device memory one batch may plan to use
GIB = 2 ** 30

# torch >= 2.5 has torch.OutOfMemoryError (CUDA and other accelerators); older versions torch.cuda.OutOfMemoryError.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e})
_CPU_OOM_TEXT = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


class DeviceMemoryError(EditDecayError):
    """A batch of a stage does not fit the device's memory, even after halving the batch size."""

    def __init__(self, stage: str, batch_size: int, bytes_asked: int | None, device, detail: str = ""):
        self.stage, self.batch_size, self.bytes_asked, self.device = stage, batch_size, bytes_asked, str(device)
        free = free_bytes(device)
        asked = f"about {fmt_bytes(bytes_asked)} estimated for this batch" if bytes_asked else "memory not estimated"
        have = f"; {fmt_bytes(free)} free on {device}" if free is not None else f" on {device}"
        super().__init__(
            f"stage {stage!r}: out of memory at batch size {batch_size} ({asked}{have}). "
            f"Use a device with more memory, a smaller model dtype (bfloat16), spread the model over devices "
            f"(--device auto), or fewer context templates / shorter prompts."
            + (f" [{detail.strip().splitlines()[0][:300]}]" if detail.strip() else ""))


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator failure of any device (CUDA/accelerator OOM or a failed CPU allocation)."""
    if OOM_ERRORS and isinstance(exc, OOM_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _CPU_OOM_TEXT)


def free_bytes(device) -> int | None:
    """Free memory of a CUDA device (torch.cuda.mem_get_info); None for devices without a query (CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        # Memory torch holds in its cache but does not use is free for our purposes.
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(reserved, 0))
    return None


HOST_SHARE_ENV = "EDITDECAY_HOST_MEMORY_SHARE"


def set_host_memory_share(share: float | None) -> None:
    """Let this process plan CPU batches with `share` (0 < share <= 1) of the host's available memory: 1/N in each
    of N grid stage processes running at once (grid/backends/local.py), so N of them never plan more than the
    machine has. None: all of it. Process-wide like `core.devices.set_threads`, and passed the same way (an
    environment variable of the process). Raises ValueError outside (0, 1]."""
    if share is None:
        os.environ.pop(HOST_SHARE_ENV, None)
        return
    if not 0 < float(share) <= 1:
        raise ValueError(f"host memory share {share!r} is not valid; give a fraction in (0, 1]")
    os.environ[HOST_SHARE_ENV] = repr(float(share))


def host_available_bytes() -> int:
    """This process's share (`set_host_memory_share`) of the memory the host can give without swapping
    (psutil's `available`: free memory plus reclaimable caches), in bytes, measured now."""
    import psutil

    share = float(os.environ.get(HOST_SHARE_ENV) or 1.0)
    return int(psutil.virtual_memory().available * share)


def empty_cache(device) -> None:
    """After an out-of-memory error: free what the failed batch held (frames in reference cycles included)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def plan_batch_size(stage: str, *, n_items: int, bytes_per_item: int, device, explicit: int | None = None,
                    cpu_default: int, max_size: int | None = None, reserve_bytes: int = 0,
                    fraction: float = MEMORY_FRACTION) -> int:
    """Items per batch of `stage` (see module docstring for the precedence). Always in [1, max(n_items, 1)].

    `bytes_per_item`: estimated device memory one more item costs; `reserve_bytes`: memory the stage needs
    regardless of the batch size and has not yet allocated.
    """
    n = max(int(n_items), 1)
    if explicit is not None:
        if int(explicit) < 1:
            raise ValueError(f"{stage}: batch size {explicit!r}; give an integer >= 1 or None (from free memory)")
        return min(int(explicit), n)
    free = free_bytes(device)
    if free is None:
        size = cpu_default
    else:
        budget = fraction * free - reserve_bytes
        size = int(budget // max(int(bytes_per_item), 1))
        if size < 1:
            log.warning("%s: one item needs about %s but only %s of %s free are budgeted; trying batch size 1",
                        stage, fmt_bytes(bytes_per_item), fmt_bytes(int(max(budget, 0))), fmt_bytes(free))
            size = 1
    if max_size is not None:
        size = min(size, max_size)
    return max(1, min(size, n))


# --------------------------------------------------------------------------- running in batches

@dataclass
class BatchRecord:
    """The largest batch a stage built: items and estimated bytes (items x bytes per item); batches run."""

    items: int = 0
    bytes: int = 0
    batches: int = 0


_LARGEST: contextvars.ContextVar[dict[str, BatchRecord] | None] = contextvars.ContextVar("editdecay_batches",
                                                                                         default=None)


@contextlib.contextmanager
def record_batches() -> Iterator[dict[str, BatchRecord]]:
    """Record {stage: BatchRecord} (the largest batch built) for the work done inside the block."""
    seen: dict[str, BatchRecord] = {}
    token = _LARGEST.set(seen)
    try:
        yield seen
    finally:
        _LARGEST.reset(token)


def note_batch(stage: str, size: int, bytes_per_item: int | None = None) -> None:
    """Report one batch of `size` items of `stage` to an active `record_batches()` block (if any)."""
    seen = _LARGEST.get()
    if seen is not None:
        rec = seen.setdefault(stage, BatchRecord())
        rec.items = max(rec.items, int(size))
        rec.bytes = max(rec.bytes, int(size) * int(bytes_per_item or 0))
        rec.batches += 1


def run_batched(stage: str, items: Sequence[T], fn: Callable[[Sequence[T]], R], *, batch_size: int,
                bytes_per_item: int | None, device, halve: bool = True) -> list[R]:
    """[fn(items[a:b]) for consecutive slices of at most `batch_size` items], in order.

    On out-of-memory the slice is redone with half the batch size (and later slices keep the smaller
    size); `fn` must therefore not have side effects that a failed call leaves behind. At batch size 1,
    or with `halve=False`, `DeviceMemoryError` names the stage, the batch size and the memory asked.
    """
    out: list[R] = []
    size = max(1, int(batch_size))
    start = 0
    while start < len(items):
        part = items[start:start + size]
        detail = None
        try:
            note_batch(stage, len(part), bytes_per_item)
            out.append(fn(part))
        except Exception as e:          # noqa: BLE001 -- only allocator failures are handled, the rest re-raised
            if not is_out_of_memory(e):
                raise
            detail = str(e)
        if detail is None:
            start += len(part)
            continue
        # Outside the except block: the failed batch's tensors (held by the traceback) are released.
        empty_cache(device)
        asked = bytes_per_item * len(part) if bytes_per_item else None
        if not halve or len(part) == 1:
            raise DeviceMemoryError(stage, len(part), asked, device, detail)
        size = max(1, len(part) // 2)
        log.warning("%s: out of memory at batch size %d; retrying with %d", stage, len(part), size)
    return out


@contextlib.contextmanager
def memory_guard(stage: str, batch_size: int, bytes_asked: int | None, device) -> Iterator[None]:
    """Turn an allocator failure inside the block into `DeviceMemoryError` (for work that cannot be split)."""
    detail = None
    try:
        yield
    except Exception as e:              # noqa: BLE001
        if not is_out_of_memory(e):
            raise
        detail = str(e)
    if detail is not None:
        empty_cache(device)
        raise DeviceMemoryError(stage, batch_size, bytes_asked, device, detail)


# --------------------------------------------------------------------------- estimates from the model's shape

@dataclass(frozen=True)
class ModelShape:
    """The sizes that memory estimates need, read from a transformers config."""

    d: int            # hidden size
    d_ff: int         # MLP inner width (d_k of the edited W_out)
    n_layers: int
    vocab: int
    heads: int
    kv_dim: int       # width of the cached keys (and of the values) per layer
    elt: int          # bytes per element of the model's weights/activations

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        base = unwrap_peft(model)
        c = base.config
        z = ConfigSizes.of(c)
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
        elt = torch.finfo(dtype).bits // 8
        return cls(z.d, z.d_ff, z.n_layers, int(c.vocab_size), z.heads, z.kv_heads * z.head_dim, elt)

    def forward_token_bytes(self, seq_len: int) -> int:
        """Activations of a no-grad forward that are alive at once, per token (about one block's worth,
        attention scores of eager attention included)."""
        return (8 * self.d + 4 * self.d_ff) * self.elt + 4 * self.heads * seq_len

    def grad_token_bytes(self, layers: int, seq_len: int) -> int:
        """Activations kept for a backward pass through `layers` blocks, per token."""
        return layers * ((12 * self.d + 5 * self.d_ff) * self.elt + 2 * 4 * self.heads * seq_len)

    def kv_token_bytes(self) -> int:
        """A KV-cache entry of every layer, per token."""
        return 2 * self.n_layers * self.kv_dim * self.elt

    def logits_bytes(self, positions: int, *, grad: bool = False) -> int:
        """float32 logits and log-softmax over the vocabulary (and their gradients) at `positions`."""
        return positions * self.vocab * (4 * 4 if grad else 4 * 2 + self.elt)


__all__ = ["BatchRecord", "DeviceMemoryError", "MEMORY_FRACTION", "ModelShape", "OOM_ERRORS", "fmt_bytes", "free_bytes",
           "is_out_of_memory", "memory_guard", "note_batch", "plan_batch_size", "record_batches", "run_batched"]
