"""A bounded load test on loopback: `dsv3 serve` as a real process, 8 concurrent streaming clients for a few
seconds: no failed request, every stream ends with [DONE], the server's memory stays bounded, Ctrl-C shuts it
down cleanly."""
import asyncio
import signal
import socket
import subprocess
import sys

import dsv3
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.serve.load import load, rss_mib, wait_ready


def test_concurrent_streams_under_load(tmp_path):
    tok = train_bpe(list(read_documents(None))[:40], 512)
    model = dsv3.Transformer(dsv3.preset("tiny").with_vocab(tok.vocab_size))
    model.init_weights()
    dsv3.save_model(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path / "server.log"  # a file, not a pipe: nobody reads a pipe until the end, and a full one blocks
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--api-key", "k", "--max-num-seqs", "16"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, proc, headers={"Authorization": "Bearer k"})
        asyncio.run(load(url, "ckpt", clients=2, seconds=1, max_tokens=8, api_key="k"))  # warm up
        before = rss_mib(proc.pid)
        r = asyncio.run(load(url, "ckpt", clients=8, seconds=6, max_tokens=24, api_key="k"))
        after = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        out = log.read_text()
    assert r["failed"] == 0, r["errors"]
    assert r["requests"] >= 16 and r["completion_tokens"] == 24 * r["requests"]  # ignore_eos: all 24 each
    assert after - before < 256, (before, after)  # MiB
    assert proc.returncode == 0, out[-2000:]
    assert "Application shutdown complete" in out
