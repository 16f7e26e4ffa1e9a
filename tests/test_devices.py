"""Device policy: fault classification, detection without CUDA, the gate's state."""

from __future__ import annotations

import logging

import pytest
import torch

from reranker_server.devices import GpuGate, classify_torch_failure, detect_accelerator

from .fakes import FakeAccelerator, FakeClock


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
        (RuntimeError("CUDA error: device-side assert triggered"), "cuda_error"),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "cuda_error"),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "cuda_error"),
        (RuntimeError("expected scalar type Float but found Half"), None),
        (ValueError("CUDA in a value error is not a device fault"), None),
    ],
)
def test_classify(exc: BaseException, kind: str | None) -> None:
    assert classify_torch_failure(exc) == kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_detection_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    assert detect_accelerator("cpu") is None
    assert detect_accelerator("auto") is None
    with caplog.at_level(logging.WARNING):
        assert detect_accelerator("cuda:1") is None
    assert "CUDA is not available" in caplog.text


def test_gate_checks_vram_and_cools_down() -> None:
    clock = FakeClock()
    acc = FakeAccelerator(free_mb=600)
    gate = GpuGate(acc, min_free_vram_mb=512, cooldown_s=10, clock=clock)
    assert gate.check() is None and gate.snapshot().state == "ok"
    acc.free_mb = 511
    assert gate.check() == "low_vram"
    acc.free_mb = 4000
    gate.record_failure("oom")
    state = gate.snapshot()
    assert state.state == "cooling_down" and state.cooldown_remaining_s == 10
    assert dict(state.failures) == {"oom": 1} and acc.cache_emptied == 1
    assert gate.check() == "cooldown"
    clock.now += 10
    assert gate.snapshot().state == "probing"

    def broken_probe() -> None:
        raise RuntimeError("CUDA error: unspecified launch failure")

    assert gate.check(probe=broken_probe) == "cooldown"  # probe failed: cool down again
    assert dict(gate.snapshot().failures) == {"oom": 1, "cuda_error": 1}
    clock.now += 10
    probes: list[int] = []
    assert gate.check(probe=lambda: probes.append(1)) is None
    assert probes == [1] and gate.snapshot().state == "ok"
    assert gate.check(probe=lambda: probes.append(1)) is None and probes == [1]  # once only
    assert dict(gate.snapshot().probes) == {"passed": 1, "failed": 1}
    acc.free_mb = 10
    assert gate.snapshot().state == "degraded"
    assert GpuGate(None, 0, 0).check() == "no_gpu"
