"""``dsmoe.plugins.trt``: the TensorRT plugin library of the dsmoe ops, without TensorRT.

- :mod:`~dsmoe.plugins.trt.spec` — the plugins once: names (``DsRoute``, ``DsMoE``), version,
  namespace ``dsmoe``, fields, I/O and kernel-argument bindings; read by the exporter and rendered
  into the C++ header.
- :func:`build_plugins` — ``libdsmoe_trt_plugins.so`` (IPluginV3 plugins + ``getCreators``,
  the AOT Triton kernels embedded, launched through the lazily opened CUDA driver), cached.
- :mod:`~dsmoe.plugins.trt.harness` — drives the library through the plugin ABI as TensorRT
  would (ctypes over a small C++ shim), for the tests.

The C++ sources sit beside the ops they implement: ``plugins/route/dsRoutePlugin.*``,
``plugins/moe/dsMoePlugin.*``, and the shared parts here (``dsPluginCommon``, ``dsLauncher``,
``cudaDriver``, ``dsPlugins.cpp`` with the entry points, ``harness.cpp``).
"""

from dsmoe.plugins.trt.build import PluginBuild, PluginBuildError, build_plugins, find_nvcc, find_tensorrt_include
from dsmoe.plugins.trt.spec import HARNESS, LIBRARY, NAMESPACE, ONNX_DOMAIN, PLUGINS

__all__ = ["HARNESS", "LIBRARY", "NAMESPACE", "ONNX_DOMAIN", "PLUGINS", "PluginBuild", "PluginBuildError",
           "build_plugins", "find_nvcc", "find_tensorrt_include"]
