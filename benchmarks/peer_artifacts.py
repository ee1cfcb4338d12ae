"""The artifacts of the CPU peer comparison (``dsmoe bench --suite quant``), made once into
``out/bench-cache/`` and reused: the checkpoint, dsmoe's int4/int8 exports of it, and llama.cpp's
GGUFs of it made **the way llama.cpp's users make them** — its own ``convert_hf_to_gguf.py`` to a
bf16 GGUF, then its ``llama-quantize`` to Q4_0, Q4_K_M and Q8_0 (default mixes) — beside the GGUF
dsmoe's own writer makes (:mod:`dsmoe.bench.gguf_export`, Q4_0 everywhere: the ``--pure`` layout).

The checkpoint is ``dsmoe init --preset deepseek-moe-16b --set num_hidden_layers=L --dtype
bfloat16`` (random weights, seed 0). It has no tokenizer, and llama.cpp's converter needs one:
a tiny SentencePiece model (64 pieces, trained here in a fraction of a second) is put beside
symlinks to the checkpoint's files in a staging directory; the converter pads the vocabulary to
the config's 102400 entries, which is all the benchmark needs (llama-bench feeds random ids).

Every file is written through :func:`dsmoe.outputs.write_output_file` (a temporary beside it,
renamed into place when complete, removed on any failure or signal), so an interrupted run leaves
nothing that a later run would take for finished.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import sys
import time
from pathlib import Path

from dsmoe.bench.gguf_export import write_gguf
from dsmoe.bench.llama_cpp import REPO, find_llama_bench
from dsmoe.export import REPORT_FILE

from dsmoe.children import run_child
from dsmoe.outputs import write_output_file

CACHE = REPO / "out" / "bench-cache"
LLAMA_QTYPES = ("Q4_0", "Q4_K_M", "Q8_0")
CONVERT_ENV = "DSMOE_LLAMA_CONVERT"
_DSMOE = [sys.executable, "-c", "from dsmoe.app.cli import main; main()"]
_EXPORT = [sys.executable, "-c", "from dsmoe.app.cli import export_main; export_main()"]


def find_converter() -> tuple[Path | None, str]:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$DSMOE_LLAMA_CONVERT``, else the sources beside the
    build that holds ``llama-bench`` (``…/llama_cpp_python-*/vendor/llama.cpp``, the layout of
    ``benchmarks/README.md``'s recipe)."""
    cands = [os.environ.get(CONVERT_ENV)]
    exe, _ = find_llama_bench()
    if exe is not None:
        root = exe.resolve().parent.parent.parent  # …/build/bin/llama-bench → the folder holding build/
        cands += sorted(glob.glob(str(root / "llama_cpp_python-*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")))
        cands.append(str(root / "convert_hf_to_gguf.py"))
    for c in cands:
        if c and Path(c).is_file():
            return Path(c), ""
    return None, (f"llama.cpp's convert_hf_to_gguf.py was not found (${CONVERT_ENV}, or the llama_cpp_python-* sources "
                  "beside the llama.cpp build): see benchmarks/README.md")


def find_quantize() -> tuple[Path | None, str]:
    exe, why = find_llama_bench()
    if exe is None:
        return None, why
    q = exe.parent / "llama-quantize"
    return (q, "") if q.is_file() else (None, f"llama-quantize is not beside {exe}: build it (benchmarks/README.md)")


def _run(argv: list[str], what: str, say, **kw) -> None:
    say(f"{what}: {' '.join(str(a) for a in argv[-6:])}")
    t = time.perf_counter()
    proc = run_child([str(a) for a in argv], **kw)  # its own process group, gone with dsmoe
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")
    say(f"{what}: done in {time.perf_counter() - t:.0f} s")


def checkpoint(layers: int, say, cache: Path = CACHE, preset: str = "deepseek-moe-16b") -> Path:
    """The bf16 random checkpoint of ``preset`` cut to ``layers`` layers."""
    out = cache / f"{preset}-{layers}l-bf16"
    if not (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _run([*_DSMOE, "init", out, "--preset", preset, "--set", f"num_hidden_layers={layers}",
              "--dtype", "bfloat16", "--seed", "0", "--force"], "dsmoe init", say)
    return out


def export(ckpt: Path, bits: int, say) -> Path:
    """``dsmoe-export CKPT --quant int{bits} --stream`` into ``CKPT-int{bits}`` unless finished there."""

    out = ckpt.with_name(f"{ckpt.name}-int{bits}")
    if not (out / REPORT_FILE).is_file():
        _run([*_EXPORT, ckpt, "--out", out, "--quant", f"int{bits}", "--stream", "--force"], f"dsmoe-export int{bits}", say)
    return out


def _tokenizer_model() -> bytes:
    """A 64-piece SentencePiece model: the vocabulary llama.cpp's converter insists on."""
    try:
        import sentencepiece as spm  # lazy: optional (the `llama` extra), only the converter path needs it
    except ImportError:
        raise FileNotFoundError("llama.cpp's converter needs a tokenizer and dsmoe makes it with sentencepiece: "
                                "pip install -e '.[llama]'") from None

    buf = io.BytesIO()
    text = (f"the quick brown fox jumps over the lazy dog {i}" for i in range(200))
    spm.SentencePieceTrainer.train(sentence_iterator=text, model_writer=buf, vocab_size=64, model_type="bpe",
                                   minloglevel=2)
    return buf.getvalue()


def _stage(ckpt: Path) -> Path:
    """A directory the converter reads: symlinks to the checkpoint's files plus ``tokenizer.model``."""
    stage = ckpt.with_name(f"{ckpt.name}-hf")
    tmp = stage.with_name(f".{stage.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in ckpt.iterdir():
            if f.suffix in (".json", ".safetensors") and not f.name.startswith("."):
                (tmp / f.name).symlink_to(f.resolve())
        (tmp / "tokenizer.model").write_bytes(_tokenizer_model())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, half made
        raise
    shutil.rmtree(stage, ignore_errors=True)  # ours: a stage of an earlier run
    os.replace(tmp, stage)
    return stage


def llama_ggufs(ckpt: Path, say, qtypes=LLAMA_QTYPES) -> dict[str, Path]:
    """``{qtype: path}``: llama.cpp's converter (bf16) then ``llama-quantize`` per type."""
    conv, why = find_converter()
    quant, why_q = find_quantize()
    if conv is None or quant is None:
        raise FileNotFoundError(why or why_q)
    bf16 = ckpt.with_name(f"{ckpt.name}-llama-bf16.gguf")
    if not bf16.is_file():
        stage = _stage(ckpt)
        try:
            write_output_file(bf16, lambda tmp: _run([sys.executable, conv, stage, "--outfile", tmp, "--outtype", "bf16"],
                                                     "convert_hf_to_gguf.py", say), force=False, inputs=[ckpt])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    out = {}
    for q in qtypes:
        path = ckpt.with_name(f"{ckpt.name}-llama-{q}.gguf")
        if not path.is_file():
            write_output_file(path, lambda tmp, q=q: _run([quant, bf16, tmp, q, str(os.cpu_count() or 1)],
                                                          f"llama-quantize {q}", say), force=False, inputs=[bf16])
        out[q] = path
    return out


def dsmoe_gguf(ckpt: Path, say, qtype: str = "Q4_0") -> Path:
    """dsmoe's own GGUF writer on the same checkpoint (every linear ``qtype``: llama-quantize's ``--pure``)."""

    path = ckpt.with_name(f"{ckpt.name}-dsmoe-{qtype}.gguf")
    if not path.is_file():
        say(f"dsmoe's GGUF writer ({qtype}) → {path.name}")
        write_output_file(path, lambda tmp: write_gguf(str(ckpt), tmp, qtype=qtype), force=False, inputs=[ckpt])
    return path
