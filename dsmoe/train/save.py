"""Write a trained model as an HF-layout checkpoint: ``config.json``, bf16 ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` (chat template), ``generation_config.json`` and the
training log — atomically (:class:`dsmoe.outputs.OutputDir`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsmoe.outputs import OutputDir
from dsmoe.train.tokenizer import tokenizer_config


def save_minimoe(model, tok, out: str | Path, *, force: bool, log_path: Path | None = None) -> Path:


    config = model.config
    with OutputDir(out, force=force, kind="checkpoint") as staging:
        tmp = staging.path
        sd = {k: t.detach().to(torch.bfloat16).contiguous() for k, t in model.state_dict().items()
              if not k.endswith("inv_freq")}
        cfg = config.to_dict()
        cfg["torch_dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(tokenizer_config())
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}, indent=2) + "\n")
        if log_path is not None and log_path.is_file():
            shutil.copyfile(log_path, tmp / "train_log.jsonl")
        return staging.commit()
