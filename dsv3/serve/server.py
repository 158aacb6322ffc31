"""`dsv3 serve CKPT`: load a checkpoint, build the engine (prefix cache with a disk tier), serve the API."""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import threading
from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.info import refuse_unless_fits
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.llm import LoadConfig, inference_dtype
from dsv3.io import load_model
from dsv3.options import add_flags, from_args
from dsv3.runtime import resolve_device
from dsv3.tokenizer import Tokenizer


def default_model_name(ckpt: Path) -> str:
    """The checkpoint directory's name; for a dsv3 run's `RUN/checkpoints/step_N/model`, `RUN-step_N`."""
    p = ckpt.resolve()
    if p.name == "model" and p.parent.name.startswith("step_") and p.parent.parent.name == "checkpoints":
        return f"{p.parent.parent.parent.name}-{p.parent.name}"
    return p.name


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face layout with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", action="append", default=[], help="accepted key (repeatable); none: open")
    keys.add_argument("--api-keys-file", help="file with one accepted key per line")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name; "
                   "RUN-step_N for a dsv3 run's RUN/checkpoints/step_N/model)")
    p.add_argument("--cache-dir", help="disk tier of the prefix cache (DeepSeek's context caching); survives restarts")
    p.add_argument("--cache-disk-gb", type=float, default=16.0, help="size bound of --cache-dir")
    p.add_argument("--cache-host-gb", type=float, default=1.0, help="host-memory tier between the pool and disk")
    p.add_argument("--max-queue", type=int, default=512, help="requests in the engine before 503")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight per API key before 429")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--speculative-tokens", type=int, default=0, help="MTP drafts per step (0 or 1)")
    add_flags(p, LoadConfig)


def run(args) -> None:
    try:  # the optional 'serve' extra (uvicorn, fastapi): imported here so `dsv3 --help` works without it
        import uvicorn

        from dsv3.serve.app import ServerConfig, create_app
    except ImportError as e:
        raise SystemExit('dsv3 serve needs the serve extra: pip install -e ".[serve]"') from e

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    load = from_args(LoadConfig, args)
    device = resolve_device(load.device)
    ckpt = Path(args.checkpoint)
    dtype = inference_dtype(load.dtype, device)
    if device.type == "cuda":  # refused up front with the memory plan, never by running out of memory mid-load
        refuse_unless_fits(ModelConfig.from_json(ckpt), torch.cuda.get_device_properties(device).total_memory,
                           load.fp8_weights, dtype.itemsize)
    model = load_model(ckpt, device=device, dtype=dtype, fp8_weights=load.fp8_weights)
    keys = args.api_key
    if args.api_keys_file:
        keys = [line.strip() for line in Path(args.api_keys_file).read_text().splitlines() if line.strip()]
    engine = Engine(model, Tokenizer.from_dir(ckpt), EngineConfig(
        max_num_seqs=args.max_num_seqs, speculative_tokens=args.speculative_tokens,
        host_cache_bytes=int(args.cache_host_gb * 2**30) if args.cache_dir else 0,
        disk_cache_dir=args.cache_dir, disk_cache_bytes=int(args.cache_disk_gb * 2**30)))
    engine.warmup()
    # Everything loaded so far lives as long as the server: out of the cyclic collector's sight, so that a full
    # collection, which stops every thread, no longer walks it (measured: docs/serving.md#results).
    gc.collect()
    gc.freeze()
    config = ServerConfig(model_name=args.model_name or default_model_name(ckpt), api_keys=frozenset(keys),
                          max_concurrent_per_key=args.max_concurrent, max_queue=args.max_queue)
    app = create_app(engine, config)
    # HTTP on a thread of its own, the engine on the main thread (async_engine.py says why). Signals reach only the
    # main thread: they ask uvicorn to exit, as its own handler would (a second Ctrl-C forces it); its lifespan
    # shutdown then stops the engine loop and flushes the prefix cache, and drive() returns once HTTP is done.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=30,
                                           log_level="info"))
    http = threading.Thread(target=server.run, name="dsv3-http")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http.start()
    threading.Thread(target=lambda: (http.join(), app.state.engine.close()), daemon=True).start()
    app.state.engine.drive()
    http.join()
    if not server.started:
        raise SystemExit(f"dsv3 serve: could not serve on {args.host}:{args.port} (see the log above)")
