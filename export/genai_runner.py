"""Run an export through ONNX Runtime GenAI, the real client: a thin wrapper over its Python API.

``onnxruntime-genai`` is optional (``pip install 'dsmoe[genai]'``); it is imported when a
:class:`GenaiModel` is made, and its absence is one :class:`DsmoeError` line. The model is
loaded from the export's own ``genai_config.json`` with no edits (``threads`` overlays the
intra-op thread count, the one thing the benchmarks set for every backend alike).

Batches: GenAI 0.18 on the CPU finds padding by the pad id at the *end* of a row (it scans each
row from the right: trailing ``pad_token_id`` tokens get mask 0, everything before them mask 1),
so :meth:`GenaiModel.generate` right-pads unequal prompts. Left padding is attended as if it were
text there (measured: wrong tokens for the shorter prompt). A prompt of a batch that itself ends
with the pad id would be cut, so it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dsmoe.export.files import verify_export_files
from dsmoe.export.genai_config import GENAI_CONFIG, check_genai_config, genai_can_run
from dsmoe.export.onnx_writer import CONFIG_FILE

from dsmoe import load_config
from dsmoe.errors import DsmoeError


def require_genai():
    """The ``onnxruntime_genai`` module, or a one-line :class:`DsmoeError` when it is missing."""
    try:
        import onnxruntime_genai as og  # lazy: optional dependency
    except ImportError:
        raise DsmoeError("the genai backend needs onnxruntime-genai: pip install 'dsmoe[genai]' "
                         "(or pip install onnxruntime-genai)") from None
    return og


def _genai_doc(d: Path) -> dict:
    """``genai_config.json`` as a JSON object, or one line saying it is not one."""
    try:
        doc = json.loads((d / GENAI_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DsmoeError(f"{d / GENAI_CONFIG} is not valid JSON ({e}); export again") from None
    if not isinstance(doc, dict):
        raise DsmoeError(f"{d / GENAI_CONFIG} is not a JSON object; export again")
    return doc


class GenaiModel:
    """An export directory loaded by ONNX Runtime GenAI from its ``genai_config.json``."""

    def __init__(self, export_dir: str | Path, *, threads: int | None = None):
        self.og = og = require_genai()
        d = Path(export_dir)
        if not (d / GENAI_CONFIG).is_file():
            if (d / CONFIG_FILE).is_file() and not genai_can_run(load_config(d)):
                raise DsmoeError(f"{d} is an MLA export: onnxruntime-genai feeds per-layer key/value caches, not the "
                                 "latent cache (no genai_config.json is written for it); use --backend ort")
            raise DsmoeError(f"{d} holds no {GENAI_CONFIG}: re-export it with dsmoe-export (it writes one)")
        self.dir = d
        checked = verify_export_files(d)
        self.doc = _genai_doc(d)
        if not checked:  # an export older than the digests: genai_config.json against the graph, in one line
            try:
                problems = check_genai_config(d)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                problems = [f"it lacks or mangles {e}"]
            if problems:
                raise DsmoeError(f"{d / GENAI_CONFIG} does not match {d}'s model: {problems[0]}"
                                 + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "") + "; export again")
        try:
            config = og.Config(str(d))
        except RuntimeError as e:
            raise DsmoeError(f"onnxruntime-genai cannot read {d / GENAI_CONFIG}: {str(e).strip().splitlines()[0]}") from None
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        try:
            self.model = og.Model(config)
        except RuntimeError as e:  # e.g. a hand-edited config naming a missing input
            raise DsmoeError(f"onnxruntime-genai cannot load {d}: {str(e).strip().splitlines()[0]}") from None
        try:
            self.pad_id = int(self.doc["model"]["pad_token_id"])
            self.vocab_size = int(self.doc["model"]["vocab_size"])
            self.share_buffer = bool(self.doc["search"]["past_present_share_buffer"])
        except (KeyError, TypeError, ValueError) as e:
            raise DsmoeError(f"{d / GENAI_CONFIG} lacks or mangles {e} (model.pad_token_id, model.vocab_size and "
                             "search.past_present_share_buffer are needed); export again") from None

    def tokenizer(self):
        """GenAI's tokenizer for the export (needs ``tokenizer.json`` beside the model)."""
        if not (self.dir / "tokenizer.json").is_file():
            raise DsmoeError(f"--prompt needs {self.dir / 'tokenizer.json'}; use --prompt-ids instead")
        try:
            return self.og.Tokenizer(self.model)
        except RuntimeError as e:  # a tokenizer.json GenAI's own tokenizer cannot read (e.g. a WordLevel model)
            raise DsmoeError(f"onnxruntime-genai cannot read {self.dir / 'tokenizer.json'} ({' '.join(str(e).split())}); "
                             "use --backend ort (the tokenizers library) or --prompt-ids") from None

    def generator(self, max_length: int, batch_size: int = 1):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, batch_size=batch_size)
        return self.og.Generator(self.model, params)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, on_start: Callable[[], None] | None = None,
                 on_token: Callable[[], None] | None = None) -> list[list[int]]:
        """Greedy tokens for each prompt (GenAI's search: a sequence ends at an eos id, which is
        kept, or after ``max_new_tokens``). Unequal prompts are right-padded with the pad id.
        ``on_start`` is called before the prompt goes in, ``on_token`` after each step (timing)."""
        if not prompts or any(not p for p in prompts):
            raise DsmoeError("the prompt is empty")
        for p in prompts:
            bad = [i for i in p if not 0 <= i < self.vocab_size]
            if bad:
                raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            if len(prompts) > 1 and p[-1] == self.pad_id:
                raise DsmoeError(f"a prompt of a batch ends with the pad id {self.pad_id}, which GenAI would take "
                                 "for padding; run it on its own")
        longest = max(len(p) for p in prompts)
        ids = np.full((len(prompts), longest), self.pad_id, dtype=np.int32)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        gen = self.generator(longest + max_new_tokens, len(prompts))
        if on_start:
            on_start()
        gen.append_tokens(ids)
        eos = set(self.eos_ids())
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        while not gen.is_done():
            gen.generate_next_token()
            if on_token:
                on_token()
            for b, t in enumerate(gen.get_next_tokens()):
                if not done[b]:
                    out[b].append(int(t))
                    done[b] = int(t) in eos
        return out

    def eos_ids(self) -> list[int]:
        eos = self.doc["model"]["eos_token_id"]
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


class GenaiStep:
    """GenAI behind the decoder-step signature, for the benchmarks' teacher-forced cases:
    ``(input_ids, attention_mask, position_ids, past) -> (logits, present)`` for batch 1.

    GenAI keeps its own KV cache and cannot take one from outside, so a call whose past is not
    the one this object returned last must start from a prefix GenAI has seen: the empty cache (a
    new sequence) or the prefix of :meth:`prime`, which is run once and returned to by
    ``rewind_to``. ``present`` is fetched from GenAI (``get_output``) only for a new sequence (the
    prefill, which the benchmarks compare); decode steps return a placeholder for it.
    """

    def __init__(self, model: GenaiModel, max_length: int):
        self.model, self.max_length = model, int(max_length)
        self.gen, self.length, self.prefix = None, 0, 0

    def prime(self, prompt_ids) -> None:
        """Run ``prompt_ids`` once; a later call with a foreign past of that length continues it."""
        self.gen = self.model.generator(self.max_length)
        self.gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32).reshape(1, -1))
        self.length = self.prefix = int(np.asarray(prompt_ids).size)

    def __call__(self, input_ids, attention_mask, position_ids, past):
        ids = np.asarray(input_ids, dtype=np.int32).reshape(1, -1)
        n_past = _past_length(past)
        if n_past == 0:
            self.gen, self.length = self.model.generator(self.max_length), 0
        elif not (isinstance(past, _Placeholder) and self.length == n_past):
            if self.gen is None or self.prefix != n_past:
                raise DsmoeError(f"GenAI cannot take a KV cache of {n_past} slots it did not make "
                                 f"(primed with {self.prefix})")
            self.gen.rewind_to(self.prefix)
            self.length = self.prefix
        self.gen.append_tokens(ids)
        self.length += ids.shape[1]
        logits = np.array(self.gen.get_output("logits"))
        if n_past == 0:
            return logits, self._present()
        return logits, _Placeholder(self.length)

    def _present(self):
        n, L = self.length, self.model.doc["model"]["decoder"]["num_hidden_layers"]
        return [tuple(np.array(self.gen.get_output(f"present.{i}.{kind}"))[:, :, :n] for kind in ("key", "value"))
                for i in range(L)]


class _Placeholder(list):
    """Stands for GenAI's cache of ``n`` slots between decode steps (it stays inside GenAI)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n


def _past_length(past) -> int:
    if isinstance(past, _Placeholder):
        return past.n
    return int(past[0][0].shape[2]) if past else 0
