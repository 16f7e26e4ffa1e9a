"""Device policy: the only module that touches `torch.cuda`.

`Accelerator` is the seam between the engine and a GPU. `CudaAccelerator` is the real one; tests put
a fake behind the same protocol to cause faults this machine can't (OOM, CUDA errors, low VRAM).
`GpuGate` decides, per request, whether the GPU may be used (free VRAM, cool-down after a failure).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from .extras import TORCH_EXTRA, require_torch
from .types import FallbackReason, GpuStatus

logger = logging.getLogger(__name__)

FailureKind = Literal["oom", "cuda_error", "invalid_scores"]


class Accelerator(Protocol):
    """What the engine and the stage-2 runner need from a GPU."""

    @property
    def torch_device(self) -> str:
        """The device string handed to torch / sentence-transformers, e.g. "cuda:0"."""
        ...

    def name(self) -> str:
        """Human-readable device name for /health."""
        ...

    def free_memory_mb(self) -> float:
        """Free device memory right now, counting what other processes use."""
        ...

    def total_memory_mb(self) -> float:
        """Total device memory."""
        ...

    def empty_cache(self) -> None:
        """Give cached, unused memory back to the driver."""
        ...

    def before_forward(self, pairs: int) -> None:
        """Called before each forward pass of `pairs` pairs (a no-op on real devices)."""
        ...

    def classify_failure(self, exc: BaseException) -> FailureKind | None:
        """ "oom" or "cuda_error" if `exc` is a device fault, None if it is something else."""
        ...


def cuda_runtime_available() -> bool:
    """Whether torch sees a usable CUDA device (False when torch is a CPU build or absent: the
    base install has no torch, see extras.py)."""
    try:
        import torch
    except ImportError:
        _say_torch_is_missing()
        return False
    return bool(torch.cuda.is_available())


@functools.cache
def _say_torch_is_missing() -> None:
    """Once per process: startup asks `cuda_runtime_available` more than once."""
    logger.info("torch is not installed: no GPU stage (GPU hosts: %s)", TORCH_EXTRA)


class CudaAccelerator:
    """A real CUDA device, through torch.

    `memory_limit_mb` caps this process's share of the card (torch's per-process memory
    fraction), so that a local LLM on the same GPU keeps its room; free memory then means the
    smaller of what the driver has free (other processes counted) and what is left of the cap.
    """

    def __init__(self, index: int, memory_limit_mb: float = 0) -> None:
        import torch

        self._index = index
        self._limit_mb = memory_limit_mb
        if memory_limit_mb:
            fraction = min(1.0, memory_limit_mb / self.total_memory_mb())
            torch.cuda.set_per_process_memory_fraction(fraction, index)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self._index}"

    def name(self) -> str:
        import torch

        return str(torch.cuda.get_device_name(self._index))

    def free_memory_mb(self) -> float:
        import torch

        free, _total = torch.cuda.mem_get_info(self._index)
        free_mb = free / 2**20
        if self._limit_mb:
            reserved_mb = torch.cuda.memory_reserved(self._index) / 2**20
            free_mb = min(free_mb, self._limit_mb - reserved_mb)
        return max(0.0, free_mb)

    def total_memory_mb(self) -> float:
        import torch

        _free, total = torch.cuda.mem_get_info(self._index)
        return total / 2**20

    def empty_cache(self) -> None:
        import torch

        try:
            torch.cuda.empty_cache()
        except Exception:  # a broken context can fail here too; nothing more to do
            logger.warning("torch.cuda.empty_cache() failed", exc_info=True)

    def before_forward(self, pairs: int) -> None:
        return None

    def classify_failure(self, exc: BaseException) -> FailureKind | None:
        return classify_torch_failure(exc)


def classify_torch_failure(exc: BaseException) -> FailureKind | None:
    """Map a torch exception to a device fault kind."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return "cuda_error"
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if "out of memory" in text.lower():
            return "oom"
        if any(marker in text for marker in ("CUDA", "cuDNN", "CUBLAS", "NCCL", "device-side")):
            return "cuda_error"
    return None


def detect_accelerator(device: str, memory_limit_mb: float = 0) -> Accelerator | None:
    """Pick the stage-2 GPU from the `device` setting; None means "no usable GPU".

    `auto` and `cuda` take the GPU with the most free memory; `cuda:N` takes that one.
    """
    if device == "cpu":
        return None
    if device != "auto":  # a GPU asked for by name needs torch; `auto` without it means none
        require_torch(f"RERANKER_DEVICE={device}")
    if not cuda_runtime_available():
        if device != "auto":
            logger.warning("device=%s asked for, but CUDA is not available: no GPU stage", device)
        return None
    import torch

    count = torch.cuda.device_count()
    if ":" in device:
        index = int(device.split(":", 1)[1])
        if index >= count:
            logger.warning("device=%s asked for, but only %d CUDA device(s) exist", device, count)
            return None
    else:
        index = max(range(count), key=lambda i: torch.cuda.mem_get_info(i)[0])
    return CudaAccelerator(index, memory_limit_mb)


class GpuGate:
    """Per-request decision "may stage 2 use the GPU now?": a free-VRAM check and a breaker.

    After a device fault the breaker opens for `cooldown_s` (answers come from stage 1). When the
    cool-down is over, the next request first runs `probe` (a one-pair forward pass); if it passes
    the GPU is used again, if it fails the cool-down starts over.
    """

    def __init__(
        self,
        accelerator: Accelerator | None,
        min_free_vram_mb: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accelerator = accelerator
        self._min_free_mb = min_free_vram_mb
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cooldown_until = 0.0
        self._needs_probe = False
        self._last_failure: FailureKind | None = None
        self.failures: dict[str, int] = {}
        self.probes: dict[str, int] = {"passed": 0, "failed": 0}

    def check(self, probe: Callable[[], object] | None = None) -> FallbackReason | None:
        """None if the GPU may be used now, else why not; runs `probe` when half-open."""
        if self.accelerator is None:
            return "no_gpu"
        with self._lock:
            if self._clock() < self._cooldown_until:
                return "cooldown"
            probing = self._needs_probe
        try:
            free = self.accelerator.free_memory_mb()
            if free >= self._min_free_mb and probing and probe is not None:
                probe()
        except Exception as exc:  # a broken device fails here too
            kind = self.accelerator.classify_failure(exc) or "cuda_error"
            if probing:
                self.probes["failed"] += 1
            self.record_failure(kind)
            return "cooldown" if probing else kind
        if free < self._min_free_mb:
            return "low_vram"
        if probing and probe is not None:
            with self._lock:
                self._needs_probe = False
            self.probes["passed"] += 1
            logger.info("GPU probe passed; stage 2 is back on the GPU")
        return None

    def record_failure(self, kind: FailureKind) -> None:
        """Free cached memory and open the breaker; count the failure."""
        with self._lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            self._last_failure = kind
            self._cooldown_until = self._clock() + self._cooldown_s
            self._needs_probe = True
        if self.accelerator is not None:
            self.accelerator.empty_cache()

    def snapshot(self, read_memory: bool = True) -> GpuStatus:
        """The gate's state as data (for /health and /metrics). `read_memory`: ask the device
        for its free and total memory (a device call: keep it off the event loop); without it
        `degraded` is never reported."""
        if self.accelerator is None:
            return GpuStatus("absent")
        name = free = total = None
        if read_memory:
            try:
                name = self.accelerator.name()
                free = self.accelerator.free_memory_mb()
                total = self.accelerator.total_memory_mb()
            except Exception:
                logger.warning("could not read GPU memory", exc_info=True)
        with self._lock:
            remaining = self._cooldown_until - self._clock()
            needs_probe = self._needs_probe
            last_failure = self._last_failure
        cooling = remaining > 0
        if cooling:
            state = "cooling_down"
        elif needs_probe:
            state = "probing"  # the next request checks the GPU with one pair
        elif free is not None and free < self._min_free_mb:
            state = "degraded"  # too little free VRAM: answers come from stage 1
        else:
            state = "ok"
        return GpuStatus(
            state=state,
            device=self.accelerator.torch_device,
            name=name,
            free_mb=free,
            total_mb=total,
            last_failure=last_failure,
            cooldown_remaining_s=round(remaining, 1) if cooling else None,
            cooldown_until=round(time.time() + remaining, 1) if cooling else None,
            failures=tuple(self.failures.items()),
            probes=tuple(self.probes.items()),
        )
