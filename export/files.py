"""The files of an export belong together: digests recorded at export, checked on every load.

``export_model`` records in ``export_report.json`` (``"digests"``) a digest of every file it
wrote; :func:`verify_export_files` — called by every reader of an export directory
(:class:`dsmoe.export.OrtDecoder`, the GenAI and TensorRT runners, so ``generate``, ``eval``,
``serve``, ``experts`` and the benchmarks) — refuses a directory whose files do not match in one
line: a ``model.onnx`` copied in from another export, an edited ``genai_config.json``, a
truncated ``model.onnx.data``.

A digest is cheap whatever the size: the size, plus SHA-256 of the whole file up to
:data:`FULL_HASH_BYTES` (every graph proto and config), else of the first and last MiB and
:data:`SAMPLES` evenly spaced 64-KiB blocks (external data: gigabytes; any other export's data
differs in size or in these bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dsmoe.errors import DsmoeError

REPORT = "export_report.json"
FULL_HASH_BYTES = 64 * 2**20
SAMPLES = 64
_BLOCK = 64 * 2**10
_END = 2**20


def file_digest(path: str | Path) -> dict:
    """``{"size", "sha256", "sampled"}`` of one file (see the module docstring)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"size": size, "sha256": h.hexdigest(), "sampled": False}
        step = (size - 2 * _END) // (SAMPLES + 1)
        offsets = [0, *(_END + step * (i + 1) for i in range(SAMPLES)), size - _END]
        for off in offsets:
            f.seek(off)
            h.update(f.read(_END if off in (0, size - _END) else _BLOCK))
    return {"size": size, "sha256": h.hexdigest(), "sampled": True}


def export_digests(d: Path, names: list[str]) -> dict[str, dict]:
    """The digests of ``names`` (files of the export directory ``d``) for the report."""
    return {n: file_digest(d / n) for n in sorted(names) if (d / n).is_file() and n != REPORT}


def verify_export_files(d: str | Path) -> bool:
    """Refuse (one :class:`DsmoeError` line) an export whose files are not the ones it was written
    with. Returns whether digests were checked: False for an export made before they were recorded
    (accepted as it is; a reader may then check what it can, e.g. genai_config.json against the graph)."""
    d = Path(d)
    try:
        report = json.loads((d / REPORT).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DsmoeError(f"{d / REPORT} is damaged ({type(e).__name__}); export again") from None
    digests = report.get("digests") if isinstance(report, dict) else None
    if not isinstance(digests, dict):
        return False
    for name, want in sorted(digests.items()):
        p = d / name
        if not p.is_file():
            raise DsmoeError(f"{p} is missing or damaged: {d} is incomplete (its {REPORT} lists it); export again")
        try:
            got = file_digest(p)
        except OSError as e:
            raise DsmoeError(f"cannot read {p}: {e.strerror}") from None
        if isinstance(want, dict) and got["size"] == want.get("size") and got["sha256"] == want.get("sha256"):
            continue
        why = f"not the file this export wrote: its size or digest differs from {REPORT}'s"
        if got["size"] == 0:
            raise DsmoeError(f"{p} is empty (a damaged export: export it again)")
        if name == "model.onnx.data":
            raise DsmoeError(f"{p} is missing or damaged ({why}); export it again")
        if name.endswith(".onnx") or name.endswith(".engine"):
            raise DsmoeError(f"{p} is damaged or {why} (copied in from another export?); export again")
        raise DsmoeError(f"{p} was changed after the export ({why}); restore it or export again")
    return True
