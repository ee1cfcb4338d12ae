"""The layer rule, pinned: core ← passes ← plugins ← export ← app (and benchmarks).

Every ``import`` in the package's sources (module level or inside a function) is parsed; an
import of a higher layer from a lower one is a back-edge and fails. Function-local imports are
allowed only for the heavy or optional third-party packages listed in ``LAZY_OK`` — never for a
dsmoe module (a function-local import is how a cycle hides) — except in the app's command modules
(``dsmoe.app.*``), which import what a command runs inside the command so that ``dsmoe --help``
stays light (still checked against the layer rule above). The model contract's names are
checked against the model itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder → installed package (pyproject's package-dir)
PACKAGES = {"dsmoe": "dsmoe", "passes": "dsmoe.passes", "plugins": "dsmoe.plugins", "export": "dsmoe.export",
            "benchmarks": "dsmoe.bench"}
CORE = 0
LAYERS = [("dsmoe.app.", 4), ("dsmoe.bench", 4), ("dsmoe.export", 3), ("dsmoe.plugins", 2), ("dsmoe.passes", 1)]
LAYER_NAMES = {0: "core", 1: "passes", 2: "plugins", 3: "export", 4: "app"}
# third-party packages that may be imported inside a function: optional extras, GPU-only, or
# only needed by one command (each such import carries a comment saying so)
LAZY_OK = {"tokenizers", "transformers", "triton", "tensorrt", "onnxruntime_genai", "cuda", "cupy", "sentencepiece",
           "matplotlib", "llama_cpp", "gguf"}
# the command modules: the CLI imports a command's library code (and torch) only when it runs
LAZY_COMMANDS = "dsmoe.app."


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + "."):
            return rank
        if module == prefix:
            return rank
    return CORE


def sources() -> list[tuple[str, Path]]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "dsmoe" and parts and parts[0] in ("passes", "plugins", "export", "bench"):
                continue  # not a source folder of its own
            out.append((".".join([package, *parts]), path))
    return out


def imports(module: str, path: Path):
    """``(imported module, line, function-local?)`` for every import in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    local: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in local
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            if base == "dsmoe":  # `from dsmoe import x`: x may be a module of dsmoe
                for a in node.names:
                    yield f"dsmoe.{a.name}" if (ROOT / "dsmoe" / f"{a.name}.py").exists() else "dsmoe", node.lineno, \
                        id(node) in local
            else:
                yield base, node.lineno, id(node) in local


ALL = sources()


def test_the_sources_are_found():
    names = {m for m, _ in ALL}
    assert {"dsmoe.config", "dsmoe.passes.pipeline", "dsmoe.export.lower", "dsmoe.plugins", "dsmoe.app.cli",
            "dsmoe.bench.harness"} <= names


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_no_import_reaches_up_a_layer(module, path):
    mine = layer(module)
    for name, line, _ in imports(module, path):
        if name == "dsmoe" or name.startswith("dsmoe."):
            theirs = layer(name)
            assert theirs <= mine, (f"{path.relative_to(ROOT)}:{line}: {module} ({LAYER_NAMES[mine]}) imports "
                                    f"{name} ({LAYER_NAMES[theirs]}), a higher layer")


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_function_local_imports_are_only_lazy_optional_packages(module, path):
    for name, line, local in imports(module, path):
        if local and not module.startswith(LAZY_COMMANDS):
            top = name.split(".")[0]
            assert top in LAZY_OK, f"{path.relative_to(ROOT)}:{line}: function-local import of {name}"


def test_the_rule_catches_a_back_edge(tmp_path):
    """The check itself: a core module importing the app is reported."""
    bad = tmp_path / "config.py"
    bad.write_text("def f():\n    from dsmoe.app.cli import main\n")
    found = [(n, local) for n, _, local in imports("dsmoe.config", bad)]
    assert found == [("dsmoe.app.cli", True)] and layer("dsmoe.app.cli") > layer("dsmoe.config")
    assert layer("dsmoe.export.lower") > layer("dsmoe.plugins.moe") > layer("dsmoe.passes.graph") > layer("dsmoe.ops")


def test_the_model_has_every_name_of_the_contract():
    import dsmoe
    from dsmoe import contract

    model = dsmoe.load("preset:tiny", overrides={"topk_method": "noaux_tc", "scoring_func": "sigmoid",
                                                 "n_group": 2, "topk_group": 1})
    moe = model.model.layers[1].mlp
    assert type(moe).__name__ == contract.MOE_BLOCK
    assert type(getattr(moe, contract.ROUTER_ATTR)).__name__ == contract.ROUTER
    assert type(getattr(moe, contract.SHARED_ATTR)).__name__ == contract.GATED_MLP
    expert = getattr(moe, contract.EXPERTS_ATTR)[0]
    assert type(expert).__name__ == contract.GATED_MLP and all(hasattr(expert, p) for p in contract.PROJS)
    keys = set(model.state_dict())
    assert any(contract.FP32_KEY.search(k) for k in keys)
    assert any(contract.expert_linear("model.layers.1.mlp").match(k.removesuffix(".weight")) for k in keys)
    assert contract.experts_path(1) + ".0.gate_proj.weight" in keys
