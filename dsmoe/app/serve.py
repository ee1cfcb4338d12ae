"""``dsmoe serve``: load the model into the engine, bind the port, run uvicorn.

Order (start-up errors are one line, exit 2, before anything binds): the source is opened and
the engine built; then the socket is bound (a taken port is one line too); then uvicorn serves
the app of :mod:`dsmoe.app.serve_api` on that socket. SIGTERM/SIGINT: uvicorn stops accepting,
waits up to ``drain_s`` for the requests in flight, and the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from dsmoe.errors import DsmoeError

BACKENDS = ("ort", "eager", "fused", "genai", "tensorrt")


@dataclass
class Served:
    """What the HTTP layer needs: the engine, its thread, text, metrics, expert load, names."""

    engine: object
    thread: object
    text: object
    metrics: object
    expert_load: object | None
    model_name: str
    api_key: str | None
    max_body: int
    backend: str


def open_engine(*, source: str, backend: str | None, max_running: int, max_model_len: int | None,
                max_step_tokens: int, max_waiting: int, expert_stats: str, window_s: float,
                dtype: str | None = None, threads: int | None = None):
    """``(engine, expert_load, backend, notes)`` for SOURCE (a checkpoint, ``preset:NAME`` or an
    export directory)."""
    import dsmoe
    from dsmoe.app.engine import Engine
    from dsmoe.app.serve_metrics import ExpertLoad, counting
    from dsmoe.export.onnx_writer import MODEL_FILE

    exported = (Path(source) / MODEL_FILE).is_file()
    backend = backend or ("ort" if exported else "eager")
    if backend == "genai":
        raise DsmoeError("--backend genai runs ONNX Runtime GenAI's own generation loop, which cannot add or drop "
                         "sequences between steps: serve the same export with --backend ort")
    if backend == "tensorrt":
        raise DsmoeError("--backend tensorrt: the engine's decoder is not batched over joining sequences here "
                         "(one sequence per engine): serve an ONNX Runtime export with --backend ort")
    if exported != (backend == "ort"):
        raise DsmoeError(f"{source} is an export: serve it with --backend ort" if exported else
                         f"--backend ort serves an export directory; {source} has no {MODEL_FILE} "
                         f"(run: dsmoe-export {source} --out DIR)")
    notes: list[str] = []
    if exported:
        from dsmoe.export import OrtDecoder
        from dsmoe.export.runner import export_target
        if dtype:
            raise DsmoeError("--dtype does not apply to an export (it runs as it was written)")
        if export_target(source) == "tensorrt":
            raise DsmoeError(f"{source} is a TensorRT export: serve an ONNX Runtime export (--target ort)")
        routers = expert_stats != "off" and _has_router_outputs(Path(source) / MODEL_FILE)
        if expert_stats != "off" and not routers:
            notes.append("expert load: off (export with --router-stats and --kv-cache dynamic to see it live)")
        # keys/values in place (no per-step cache copy); threads that sleep: a server's cores are
        # shared with its own HTTP threads and its clients, and spinning workers starved the event
        # loop (a client's disconnect went unseen until its generation ended)
        dec = OrtDecoder(source, threads=threads, router_stats=routers, kv_inplace="auto", spinning=False)
        config, mdtype, router_step = dec.config, dec.dtype, (dec if routers else None)
        plain = dec
    else:
        from dsmoe.app.generate import eager_step, fused_step
        from dsmoe.app.router_trace import eager_router_step, fused_router_step
        model = dsmoe.load(source, dtype=dtype)
        config, mdtype = model.config, next(model.parameters()).dtype
        want = expert_stats != "off" and bool(config.moe_layers)
        router_step = (eager_router_step(model) if backend == "eager" else fused_router_step(model)) if want else None
        plain = None if want else (eager_step(model) if backend == "eager" else fused_step(model))
    load = None
    if router_step is not None:
        load = ExpertLoad(config, window_s=window_s, per_expert=expert_stats == "per-expert")
        plain = counting(router_step, load)
    engine = Engine(plain, config, dtype=mdtype, max_running=max_running, max_step_tokens=max_step_tokens,
                    max_model_len=max_model_len, max_waiting=max_waiting)
    return engine, load, backend, notes


def _has_router_outputs(model_file: Path) -> bool:
    import onnx

    from dsmoe.passes.expose_router import parse_router_output_name
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return any(parse_router_output_name(o.name) is not None for o in graph.output)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why not."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise DsmoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_serve(*, source: str, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
              max_running: int = 8, max_model_len: int | None = None, max_step_tokens: int = 512,
              max_waiting: int = 256, max_body: int = 1 << 20, api_key: str | None = None,
              served_model_name: str | None = None, expert_stats: str = "layer", expert_window: float = 60.0,
              dtype: str | None = None, threads: int | None = None, drain_s: float = 30.0,
              log_level: str = "warning") -> None:
    """Serve SOURCE until SIGTERM/SIGINT (then drain and return)."""
    import uvicorn

    from dsmoe.app.engine import EngineThread
    from dsmoe.app.serve_api import create_app
    from dsmoe.app.serve_metrics import ServeMetrics
    from dsmoe.app.text import Text

    if not 0 <= port <= 65535:
        raise DsmoeError(f"--port {port} is not a TCP port")
    if max_body < 1024:
        raise DsmoeError("--max-body must be at least 1024 bytes")
    engine, load, backend, notes = open_engine(
        source=source, backend=backend, max_running=max_running, max_model_len=max_model_len,
        max_step_tokens=max_step_tokens, max_waiting=max_waiting, expert_stats=expert_stats, window_s=expert_window,
        dtype=dtype, threads=threads)
    text = Text(source)
    if text.tokenizer is None:
        notes.append(f"no tokenizer.json in {source}: prompts must be token ids (\"prompt\": [1, 2, 3]); no chat")
    elif text.template is None:
        notes.append("no chat template in tokenizer_config.json: /v1/chat/completions answers 400")
    metrics = ServeMetrics(engine, load)
    engine.on_step = metrics.on_step
    name = served_model_name or Path(source.rstrip("/")).name or source
    sock = bind(host, port)
    thread = EngineThread(engine)
    app = create_app(Served(engine, thread, text, metrics, load, name, api_key, max_body, backend))
    real_port = sock.getsockname()[1]
    print(f"dsmoe serve: {name} ({backend}) on http://{host}:{real_port}/v1 — {engine.max_running} slots, "
          f"context {engine.max_model_len}", file=sys.stderr, flush=True)
    for n in notes:
        print(f"note: {n}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_s, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has drained; a handler of ours makes that a
    # no-op, so a drained server exits 0
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    thread.start()
    try:
        server.run(sockets=[sock])
    finally:
        thread.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
