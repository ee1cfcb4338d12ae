"""``genai_config.json`` and the tokenizer files: what ONNX Runtime GenAI needs to run an export as is.

:func:`write_genai_files` writes ``genai_config.json`` beside ``model.onnx`` and copies the
checkpoint's tokenizer files (:data:`TOKENIZER_FILES`) when the source has them. The config:

- ``model``: ``type`` :data:`GENAI_MODEL_TYPE`, bos / eos / pad ids (``generation_config.json``
  over ``config.json``; pad defaults to the first eos, as GenAI's own model builder does), the
  context length (``max_position_embeddings``), vocabulary and, under ``decoder``, the file, head
  size, hidden size, heads, KV heads, layers, the I/O names (:func:`dsmoe.export.io_names`) and
  the session options (:data:`dsmoe.export.runner.SESSION_CONFIG`);
- ``search``: greedy (``do_sample`` false, one beam, ``top_k`` 1), ``max_length`` = the context
  length, and ``past_present_share_buffer`` true exactly when the export was made with
  ``--kv-cache static`` (:mod:`dsmoe.export.static_cache`): a dynamic export cannot take GenAI's
  preallocated buffers, a static one needs them.

:func:`check_genai_config` reads a written config back against the model it names (every input
and output name, the dimensions, the cache mode); ``dsmoe-export --verify`` and the tests run it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from dsmoe.export.onnx_writer import MODEL_FILE, io_names
from dsmoe.export.runner import SESSION_CONFIG
from dsmoe.export.static_cache import PAST_AXIS, check_kv_cache

from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError

GENAI_CONFIG = "genai_config.json"
# GenAI 0.18 refuses a type it does not list ("Unsupported model_type in config.json: deepseek");
# "decoder" is its generic decoder-only LLM (ModelType::IsLLM), which feeds exactly the inputs
# this decoder has (input_ids, attention_mask, position_ids, past_key_values.*).
GENAI_MODEL_TYPE = "decoder"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# GenAI's tokenizer (onnxruntime-extensions) opens tokenizer_config.json next to tokenizer.json
# and fails without it; a checkpoint that ships only tokenizer.json gets this one.
MINIMAL_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast"}


def _source_dir(source: str) -> Path | None:
    return Path(source) if Path(source).is_dir() else None


def special_token_ids(config: DeepseekConfig, source: str) -> dict:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}``: ``generation_config.json`` of the
    source checkpoint (when present) over its ``config.json``; pad defaults to the first eos id.
    Each id must lie in the vocabulary (eos may be a list); raises :class:`DsmoeError` otherwise."""
    source_dir = _source_dir(source)
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.extra.get("pad_token_id")}
    gen = source_dir / "generation_config.json" if source_dir is not None else None
    if gen is not None and gen.is_file():
        try:
            doc = json.loads(gen.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DsmoeError(f"malformed {gen}: {e}") from None
        if not isinstance(doc, dict):
            raise DsmoeError(f"malformed {gen}: not a JSON object")
        ids.update({k: doc[k] for k in ids if doc.get(k) is not None})
    eos = ids["eos_token_id"]
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
    for name, v in ids.items():
        for i in (v if isinstance(v, list) else [v]):
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config.vocab_size:
                raise DsmoeError(f"{name} {v!r} is not a token id of the vocabulary [0, {config.vocab_size})")
    return ids


def genai_config(config: DeepseekConfig, *, kv_cache: str, tokens: dict, filename: str = MODEL_FILE) -> dict:
    """The ``genai_config.json`` document of an export (see the module docstring)."""
    check_kv_cache(kv_cache)
    L = config.num_hidden_layers
    names_in, _ = io_names(L)
    assert names_in[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    return {
        "model": {
            **tokens,
            "context_length": config.max_position_embeddings,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": L,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], **SESSION_CONFIG},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0, "early_stopping": True, "min_length": 0,
            "max_length": config.max_position_embeddings,
            "past_present_share_buffer": kv_cache == "static",
        },
    }


def genai_can_run(config: DeepseekConfig) -> bool:
    """GenAI's decoder feeds per-layer key/value caches: an MLA export's single ``latent`` cache
    (:mod:`dsmoe.cache`) is not one it knows, so MLA exports get no ``genai_config.json``."""
    return not config.is_mla


def write_genai_files(out_dir: Path, *, config: DeepseekConfig, kv_cache: str, source: str,
                      tokens: dict | None = None) -> list[str]:
    """Write ``genai_config.json`` into ``out_dir`` and copy the tokenizer files of ``source``
    (a checkpoint directory; nothing for a preset). ``tokens``: :func:`special_token_ids`, when
    already read. Returns the names written."""
    src = _source_dir(source)
    written = []
    if genai_can_run(config):
        doc = genai_config(config, kv_cache=kv_cache, tokens=tokens or special_token_ids(config, source))
        (out_dir / GENAI_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
        written.append(GENAI_CONFIG)
    if src is None:
        return written
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
            written.append(name)
    if (out_dir / "tokenizer.json").is_file() and not (out_dir / "tokenizer_config.json").is_file():
        (out_dir / "tokenizer_config.json").write_text(json.dumps(MINIMAL_TOKENIZER_CONFIG, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def check_genai_config(export_dir: str | Path) -> list[str]:
    """What in ``genai_config.json`` does not match the model it names (empty: it all does): the
    file, every input/output name (the ``%d`` patterns for each layer), heads, KV heads, head size,
    vocabulary, and ``past_present_share_buffer`` against the graph's cache mode."""
    d = Path(export_dir)
    if not (d / GENAI_CONFIG).is_file():
        return [f"{d} holds no {GENAI_CONFIG}"]
    doc = json.loads((d / GENAI_CONFIG).read_text())
    dec = doc["model"]["decoder"]
    if not (d / dec["filename"]).is_file():
        return [f"decoder file {dec['filename']!r} is missing"]
    graph = onnx.load(str(d / dec["filename"]), load_external_data=False).graph
    dims = {v.name: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    ins, outs = {v.name for v in graph.input}, {v.name for v in graph.output}
    problems = []

    def expand(names: dict, have: set, kind: str) -> None:
        for key, name in names.items():
            found = [name % i for i in range(dec["num_hidden_layers"])] if "%d" in name else [name]
            problems.extend(f"{kind} {key}: {n!r} is not a model {kind}" for n in found if n not in have)

    expand(dec["inputs"], ins, "input")
    expand(dec["outputs"], outs, "output")
    if len([n for n in ins if n.startswith("past_key_values.")]) != 2 * dec["num_hidden_layers"]:
        problems.append(f"num_hidden_layers {dec['num_hidden_layers']} does not match the model's past inputs")
    past = dims.get("past_key_values.0.key", [None] * 4)
    if past[1] != dec["num_key_value_heads"] or past[3] != dec["head_size"]:
        problems.append(f"past [B, kv_heads, L, head_size] is {past}, the config says {dec['num_key_value_heads']} "
                        f"KV heads of size {dec['head_size']}")
    if dims.get("logits", [None] * 3)[2] != doc["model"]["vocab_size"]:
        problems.append(f"logits {dims.get('logits')} do not end in vocab_size {doc['model']['vocab_size']}")
    if dec["num_attention_heads"] * dec["head_size"] != dec["hidden_size"]:
        problems.append("num_attention_heads × head_size != hidden_size")
    share = doc["search"]["past_present_share_buffer"]
    if past[2] != PAST_AXIS["static" if share else "dynamic"]:
        problems.append(f"past_present_share_buffer {share} but the model's past axis is {past[2]!r}")
    return problems
