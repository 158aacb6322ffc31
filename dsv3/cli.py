"""`dsv3 <verb>`: thin dispatch. Each verb's argparse block sits next to the code it drives."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _config(target: str):
    from dsv3.config import PRESETS, ModelConfig, preset
    if target in PRESETS:
        return preset(target)
    if Path(target).exists():
        return ModelConfig.from_json(target)
    raise SystemExit(f"dsv3: {target!r} is neither a checkpoint directory / config.json nor a preset "
                     f"({', '.join(sorted(PRESETS))})")


def cmd_info(args) -> None:
    from dsv3.info import memory_plan, model_stats, plan_report, report
    cfg = _config(args.target)
    if args.tp == 1 and args.gpu_memory is None and not args.fp8_weights:
        print(report(cfg, args.seq_len, args.json))
        return
    try:
        plan = memory_plan(cfg, args.tp, args.gpu_memory, args.fp8_weights, args.reserve)
    except ValueError as e:
        raise SystemExit(f"dsv3 info: {e}") from None
    print(json.dumps(model_stats(cfg, args.seq_len) | {"plan": plan}) if args.json else
          report(cfg, args.seq_len) + "\n" + plan_report(plan))


def cmd_convert(args) -> None:
    from dsv3.io.convert import convert
    out = convert(args.src, args.dst, args.to, ue8m0=args.ue8m0, max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {out}")


def cmd_train(args) -> None:
    import json
    from dsv3.train.config import TrainConfig, from_args
    from dsv3.train.loop import Trainer
    if args.resume and not args.config:  # continue with the run's own settings unless told otherwise
        args.config = str(Path(args.out or TrainConfig().runtime.out) / "run.json")
    trainer = Trainer(from_args(args))
    summary = trainer.run()
    if trainer.layout.main:
        print(json.dumps(summary))


def cmd_quickstart(args) -> None:
    from dsv3.options import from_args
    from dsv3.quickstart import QuickstartConfig, quickstart
    quickstart(from_args(QuickstartConfig, args))


def cmd_plot(args) -> None:
    from dsv3.rl.plot import is_rl_run, plot_rl
    from dsv3.train.metrics import plot_run
    plot = plot_rl if is_rl_run(Path(args.run_dir)) else plot_run
    print(f"wrote {plot(Path(args.run_dir), args.out)}")


def cmd_sft(args) -> None:
    import json
    from dsv3.rl.sft import SFTTrainer, from_args
    print(json.dumps(SFTTrainer(from_args(args)).run()))


def cmd_grpo(args) -> None:
    import json
    if args.demo:
        from dsv3.rl.demo import DemoConfig, demo
        demo(DemoConfig(out=args.out or "runs/grpo-demo", init_from=args.init_from or None, threads=args.threads))
        return
    from dsv3.rl.grpo import GRPOTrainer, from_args
    if not args.init_from:
        raise ValueError("--init-from: the policy checkpoint to train (or --demo)")
    print(json.dumps(GRPOTrainer(from_args(args)).run()))


def cmd_rft(args) -> None:
    from dsv3.options import from_args
    from dsv3.rl.rft import RFTConfig, run
    run(from_args(RFTConfig, args))


def cmd_eval(args) -> None:
    from dsv3.options import from_args
    from dsv3.rl.evaluate import EvalConfig, run
    run(from_args(EvalConfig, args))


def cmd_generate(args) -> None:
    from dsv3.infer.generate import run
    run(args)


def cmd_serve(args) -> None:
    from dsv3.serve.server import run
    run(args)


def cmd_chat(args) -> None:
    from dsv3.infer.chat import run
    run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    sub = p.add_subparsers(dest="verb", required=True)

    info = sub.add_parser("info", help="parameters, activated parameters, KV-cache bytes and FLOPs of a model")
    info.add_argument("target", help="a preset name or a checkpoint directory / config.json")
    info.add_argument("--seq-len", type=int, default=4096, help="context length (tokens) for the FLOP count")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: the memory plan of each (weights per "
                                                        "rank, latent cache, what fits)")
    info.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                      help="memory of one GPU in GB (10^9 bytes, as cards are sold: 80 for an H100, 141 for an "
                           "H200): how many tokens of cache fit, and whether the model fits at all")
    info.add_argument("--fp8-weights", action="store_true", help="the plan with FP8 weights (as served with "
                                                                 "--fp8-weights)")
    info.add_argument("--reserve", type=float, default=None, metavar="GB",
                      help="per GPU beside weights and cache (default: dsv3.info.RESERVE_GB, 6)")
    info.set_defaults(fn=cmd_info)

    conv = sub.add_parser("convert", help="FP8 (128×128 block-scaled) <-> bf16 checkpoint conversion")
    conv.add_argument("src", help="checkpoint directory (Hugging Face layout)")
    conv.add_argument("dst", help="output directory (written atomically)")
    conv.add_argument("--to", choices=("bf16", "fp8"), required=True, help="target weight format")
    conv.add_argument("--ue8m0", action="store_true", help="round FP8 scales up to powers of two (V3.1 format)")
    conv.add_argument("--shard-gb", type=float, default=4.0, help="maximum shard size in GiB")
    conv.set_defaults(fn=cmd_convert)

    # The verbs whose argparse block sits next to the code it drives: (verb, module with add_args, help, command).
    for verb, module, text, fn in (
        ("train", "dsv3.train.config", "pretrain a DeepSeek-V3 model from text (resumable)", cmd_train),
        ("quickstart", "dsv3.quickstart", "train the tiny model on the shipped corpus (CPU, minutes) and talk to it",
         cmd_quickstart),
        ("generate", "dsv3.infer.generate", "complete a prompt or fill in the middle with a checkpoint (streams text)",
         cmd_generate),
        ("chat", "dsv3.infer.chat", "interactive multi-turn chat with a checkpoint (streams tokens)", cmd_chat),
        ("serve", "dsv3.serve.server", "DeepSeek/OpenAI-compatible HTTP API with context caching on disk", cmd_serve),
        ("sft", "dsv3.rl.sft", "supervised fine-tuning on chat data (loss on the assistant's tokens)", cmd_sft),
        ("grpo", "dsv3.rl.grpo", "GRPO with rule-based rewards on a verifiable task (R1 style); --demo", cmd_grpo),
        ("rft", "dsv3.rl.rft", "rejection-sampling fine-tuning: keep correct samples, then SFT on them", cmd_rft),
        ("eval", "dsv3.rl.evaluate", "task accuracy (greedy or pass@k) and text perplexity of a checkpoint", cmd_eval),
    ):
        parser = sub.add_parser(verb, help=text)
        importlib.import_module(module).add_args(parser)
        parser.set_defaults(fn=fn)

    plot = sub.add_parser("plot", help="PNG of a run's curves: loss, lr and expert balance; or GRPO's rewards")
    plot.add_argument("run_dir", help="a run directory written by dsv3 train or dsv3 grpo")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/plot.png)")
    plot.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"dsv3 {args.verb}: {e}")
