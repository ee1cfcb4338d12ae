"""Do the backends compute the same model? The same prompt, greedy, on each backend; the tokens
must be equal (``dsmoe compare-backends``, what ``make demo`` ends its check with).

Greedy tokens are a strict test: one wrong logit ordering at any step changes every later token.
ONNX Runtime GenAI ends a sequence at an eos id (dsmoe's loops always make ``max_new_tokens``),
so a GenAI run that stopped at an eos must equal the others up to there.
"""

from __future__ import annotations

from dsmoe.app.generate import run_generate
from dsmoe.errors import DsmoeError

EXPORT_BACKENDS = ("ort", "genai", "tensorrt")  # these run the export directory; the others the model


class BackendsDisagree(DsmoeError):
    """Two backends chose different tokens for the same prompt (a runtime failure: exit code 1)."""

    exit_code = 1


def compare_backends(*, model: str, export: str | None, prompt_ids: str, max_new_tokens: int,
                     backends: list[str]) -> dict:
    """Generate with every backend (the first is the reference); return ``{"tokens": {backend: ids},
    "agree": bool, "summary": str, "differences": [...]}``. Raise :class:`BackendsDisagree` naming the
    first token where a backend differs from the reference."""
    if len(backends) < 2:
        raise DsmoeError("--backend: name at least two backends to compare")
    if len(set(backends)) != len(backends):
        raise DsmoeError(f"--backend: a backend is named twice ({', '.join(backends)})")
    if export is None and any(b in EXPORT_BACKENDS for b in backends):
        raise DsmoeError(f"backends {', '.join(b for b in backends if b in EXPORT_BACKENDS)} run an export: "
                         f"give its directory as EXPORT (made by: dsmoe-export {model} --out DIR)")
    tokens = {}
    for b in backends:
        ids, _ = run_generate(source=export if b in EXPORT_BACKENDS else model, prompt_ids=[prompt_ids],
                              max_new_tokens=max_new_tokens, backend=b)
        tokens[b] = ids[0]
    ref_name, ref = backends[0], tokens[backends[0]]
    differences, notes = [], []
    for b in backends[1:]:
        got = tokens[b]
        n = min(len(got), len(ref))
        at = next((i for i in range(n) if got[i] != ref[i]), None)
        if at is None and len(got) < len(ref) and b == "genai":
            notes.append(f"genai stopped at an eos id after {len(got)} tokens")
        elif at is None and len(got) != len(ref):
            at = n
        if at is not None:
            differences.append({"backend": b, "token": at, "reference": ref[at] if at < len(ref) else None,
                                "got": got[at] if at < len(got) else None})
    names = _join(backends)
    doc = {"reference": ref_name, "tokens": tokens, "agree": not differences, "differences": differences, "notes": notes}
    if differences:
        d = differences[0]
        doc["summary"] = (f"{d['backend']} differs from {ref_name} at new token {d['token'] + 1} of {len(ref)} "
                          f"({ref_name} {d['reference']}, {d['backend']} {d['got']})"
                          + (f"; also {_join([x['backend'] for x in differences[1:]])}" if len(differences) > 1 else ""))
    else:
        doc["summary"] = f"{names} agree on all {len(ref)} tokens" + (f" ({'; '.join(notes)})" if notes else "")
    return doc


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
