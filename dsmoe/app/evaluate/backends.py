"""One function per backend: a window of token ids → the logits of every position, ``[S, V]`` fp32.

Each is a prefill of the window from an empty cache through the backend's decoder step (the
contract of :mod:`dsmoe.ir`, shared with ``dsmoe generate``): the eager model and the fused graph
(:func:`dsmoe.app.generate.eager_step` / :func:`~dsmoe.app.generate.fused_step`), an ONNX Runtime
export, quantized ones included (:class:`dsmoe.export.OrtDecoder`), or ONNX Runtime GenAI
(:class:`dsmoe.export.genai_runner.GenaiStep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmoe.errors import DsmoeError

BACKENDS = ("eager", "fused", "ort", "genai")
Scorer = Callable[[list[int]], np.ndarray]


@dataclass
class Model:
    """What eval needs of a source: its window scorer, vocabulary size, positions and a name."""

    score: Scorer
    vocab_size: int
    max_positions: int
    name: str
    backend: str


def is_export(source: str | Path) -> bool:
    from dsmoe.export import MODEL_FILE

    return (Path(source) / MODEL_FILE).is_file()


def default_backend(source: str | Path) -> str:
    return "ort" if is_export(source) else "eager"


def open_model(source: str | Path, backend: str | None = None, *, dtype: str = "float32", threads: int | None = None) -> Model:
    """The scorer of ``source`` (a checkpoint or an export directory) on ``backend``."""
    import torch

    backend = backend or default_backend(source)
    if backend not in BACKENDS:
        raise DsmoeError(f"unknown backend {backend!r} (backends: {', '.join(BACKENDS)})")
    exported = is_export(source)
    if backend in ("ort", "genai") and not exported:
        raise DsmoeError(f"the {backend} backend runs an exported directory; {source} is not one "
                         f"(run: dsmoe-export {source} --out DIR)")
    if backend in ("eager", "fused") and exported:
        raise DsmoeError(f"{source} is an export: use --backend ort or --backend genai")
    name = f"{Path(source).name} ({backend})"
    if backend == "genai":
        from dsmoe.export.genai_runner import GenaiModel, GenaiStep

        gm = GenaiModel(source, threads=threads)
        cfg = _config(source)

        def score_genai(ids: list[int]) -> np.ndarray:
            step = GenaiStep(gm, max_length=len(ids))
            logits, _ = step(np.asarray([ids], dtype=np.int64), None, None, [])
            return _check(np.asarray(logits, dtype=np.float32).reshape(len(ids), -1), name)

        return Model(score_genai, gm.vocab_size, cfg.max_position_embeddings, name, backend)
    if backend == "ort":
        from dsmoe.export import OrtDecoder

        step, cfg = OrtDecoder(source, threads=threads), None
        cfg, cache_dtype = step.config, step.dtype
    else:
        import dsmoe
        from dsmoe.app.generate import eager_step, fused_step

        if threads:
            torch.set_num_threads(threads)
        model = dsmoe.load(source, dtype=dtype).eval()
        cfg, cache_dtype = model.config, next(model.parameters()).dtype
        step = eager_step(model) if backend == "eager" else fused_step(model)

    from dsmoe.app.generate import empty_cache

    @torch.no_grad()
    def score(ids: list[int]) -> np.ndarray:
        S = len(ids)
        x = torch.tensor([ids], dtype=torch.int64)
        mask = torch.ones(1, S, dtype=torch.int64)
        pos = torch.arange(S, dtype=torch.int64).unsqueeze(0)
        logits, _ = step(x, mask, pos, list(empty_cache(cfg, 1, cache_dtype)))
        return _check(torch.as_tensor(logits)[0].float().numpy(), name)

    return Model(score, cfg.vocab_size, cfg.max_position_embeddings, name, backend)


def _config(source):
    import dsmoe

    return dsmoe.load_config(source)


def _check(logits: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise DsmoeError(f"{name} returned non-finite logits (NaN/Inf)")
    return logits
