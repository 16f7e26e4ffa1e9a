"""Stage 2: a sentence-transformers `CrossEncoder`, on the GPU (or the CPU by setting).

Scores are sigmoid(logit), computed from `CrossEncoder.predict`'s raw logits.
Device faults (OOM, CUDA errors) propagate to the engine, which decides what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from sentence_transformers import CrossEncoder

if TYPE_CHECKING:
    from ..devices import Accelerator

logger = logging.getLogger(__name__)


class CrossEncoderRunner:
    """Scores pairs with a cross-encoder on one torch device."""

    def __init__(
        self,
        model_path: str,
        *,
        accelerator: Accelerator | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        threads: int = 1,
        trust_remote_code: bool = False,
    ) -> None:
        self._accelerator = accelerator
        self.device = accelerator.torch_device if accelerator is not None else "cpu"
        self._batch_size = batch_size
        torch.set_num_threads(threads)
        self._model = CrossEncoder(
            model_path,
            device=self.device,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
        self._model.model.eval()
        self.name = model_path

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        if not documents:
            return []
        pairs = [(query, doc) for doc in documents]
        logits: list[np.ndarray] = []
        for start in range(0, len(pairs), self._batch_size):
            chunk = pairs[start : start + self._batch_size]
            if self._accelerator is not None:
                self._accelerator.before_forward(len(chunk))
            out = self._model.predict(
                chunk,
                batch_size=len(chunk),
                activation_fn=torch.nn.Identity(),
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            logits.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1)[:, 0])
        raw = np.concatenate(logits)
        return [float(s) for s in 1.0 / (1.0 + np.exp(-raw))]
