"""The choices the CLI's options offer, in a module that imports nothing heavy.

``dsmoe --help`` and ``dsmoe CMD --help`` render these without importing torch or ONNX Runtime;
the modules that act on them import them from here (one home for each list).
"""

# ``--kernels``: what dsmoe::route / dsmoe::moe run on CPU tensors → the plugins' kernel mode
KERNELS = {"reference": "reference", "triton-interpret": "interpret"}
# ``dsmoe generate --backend``
GENERATE_BACKENDS = ("eager", "fused", "ort", "genai", "tensorrt")
# ``dsmoe experts --backend``: the backends that can report the routers' choices
ROUTER_BACKENDS = ("eager", "fused", "ort")
# ``dsmoe bench --suite`` (besides ``quant-full`` and ``all``)
SUITES = ("moe-layer", "model", "quant")
