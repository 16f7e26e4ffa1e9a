"""Device policy: the only module that touches `torch.cuda`.

`Accelerator` is the seam between the engine and a GPU. `CudaAccelerator` is the real one; tests put
a fake behind the same protocol to cause faults this machine can't (OOM, CUDA errors, low VRAM).
`GpuGate` decides, per request, whether the GPU may be used (free VRAM, cool-down after a failure).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from .types import FallbackReason

logger = logging.getLogger(__name__)

FailureKind = Literal["oom", "cuda_error"]


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
    """Whether torch sees a usable CUDA device (False when torch is a CPU build)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


class CudaAccelerator:
    """A real CUDA device, through torch."""

    def __init__(self, index: int) -> None:
        self._index = index

    @property
    def torch_device(self) -> str:
        return f"cuda:{self._index}"

    def name(self) -> str:
        import torch

        return str(torch.cuda.get_device_name(self._index))

    def free_memory_mb(self) -> float:
        import torch

        free, _total = torch.cuda.mem_get_info(self._index)
        return free / 2**20

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


def detect_accelerator(device: str) -> Accelerator | None:
    """Pick the stage-2 GPU from the `device` setting; None means "no usable GPU"."""
    if device == "cpu":
        return None
    if not cuda_runtime_available():
        if device != "auto":
            logger.warning(
                "device=%s was asked for, but CUDA is not available: no GPU stage", device
            )
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        logger.warning("device=%s was asked for, but only %d CUDA device(s) exist", device, count)
        return None
    return CudaAccelerator(index)


class GpuGate:
    """Per-request decision "may stage 2 use the GPU now?", with a cool-down after faults."""

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
        self._last_failure: FailureKind | None = None
        self.failures: dict[str, int] = {}

    def check(self) -> FallbackReason | None:
        """None if the GPU may be used now, else why not."""
        if self.accelerator is None:
            return "no_gpu"
        with self._lock:
            if self._clock() < self._cooldown_until:
                return "cooldown"
        try:
            free = self.accelerator.free_memory_mb()
        except Exception as exc:  # querying a broken device is itself a device fault
            self.record_failure(self.accelerator.classify_failure(exc) or "cuda_error")
            return "cuda_error"
        if free < self._min_free_mb:
            return "low_vram"
        return None

    def record_failure(self, kind: FailureKind) -> None:
        """Free cached memory and start the cool-down; count the failure."""
        with self._lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            self._last_failure = kind
            self._cooldown_until = self._clock() + self._cooldown_s
        if self.accelerator is not None:
            self.accelerator.empty_cache()

    def state(self) -> dict[str, Any]:
        """What /health shows about the GPU."""
        if self.accelerator is None:
            return {"gpu_state": "absent"}
        info: dict[str, Any] = {"gpu_device": self.accelerator.torch_device}
        try:
            info["gpu_name"] = self.accelerator.name()
            info["gpu_free_mb"] = round(self.accelerator.free_memory_mb(), 1)
            info["gpu_total_mb"] = round(self.accelerator.total_memory_mb(), 1)
        except Exception:
            logger.warning("could not read GPU memory", exc_info=True)
        with self._lock:
            remaining = self._cooldown_until - self._clock()
            info["gpu_last_failure"] = self._last_failure
        if remaining > 0:
            info["gpu_state"] = "cooling_down"
            info["gpu_cooldown_remaining_s"] = round(remaining, 1)
        else:
            info["gpu_state"] = "ok"
        info["gpu_failures"] = dict(self.failures)
        return info
