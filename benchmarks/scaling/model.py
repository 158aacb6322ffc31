"""What `dsv3 train` would reach on 8 to 1,024 GPUs (8 per node), from a measured one-GPU step and the communication
our parallel code does, and where it stops scaling: the cost model of dsv3/train/scaling.py (its docstring gives the
formulas) over the 1-GPU runs of benchmarks/scaling/layouts.py named in RUNS. The write-up is docs/scaling.md.

Bandwidths: the all-to-all bandwidth benchmarks/scaling/layouts.py measured on a multi-GPU machine where a kept run
has one, else DeepSeek-V3's figures (§3.2.2 of the report: NVLink 160 GB/s, IB 50 GB/s per GPU).

    python -m benchmarks.scaling.model [--nvlink-gbs B --ib-gbs B]       # a CPU, seconds
Results: docs/scaling.md; saved as benchmarks/results/scaling/model_<device>_<date>.json, the figure in
docs/img/scaling/.
"""
from __future__ import annotations

import argparse

from matplotlib.figure import Figure

from benchmarks.results import RESULTS, load, save
from dsv3.config import preset
from dsv3.train.scaling import param_counts, step_estimate

CONFIGS = {"bench-684m": lambda: preset("bench-684m"),  # as benchmarks/scaling/layouts.py runs them (MTP off)
           "v2lite-8l": lambda: preset("deepseek-v2-lite").replace(num_hidden_layers=8)}
RUNS = {"bench-684m": "scaling/layouts-bench-684m-compiled_h100_2026-11-24.json",  # where each model's t_c comes from
        "v2lite-8l": "scaling/layouts-v2lite-8l_h200_2026-11-24.json"}


def measured_alltoall() -> list[dict]:
    """The all-to-all bandwidths of the kept multi-GPU layouts runs (GPUs' NVLink, not a CPU's gloo)."""
    runs = [load(f) for f in sorted((RESULTS / "scaling").glob("layouts*.json"))]
    return [r for d in runs if "cpu" not in d["device"] and isinstance(a := d["results"]["alltoall"], list) for r in a]


def print_rows(name: str, m: dict, t_c: float) -> None:
    print(f"\n{name}: {m['tokens_per_gpu']} tokens per GPU, t_c {1e3 * t_c:.1f} ms ({m['device']}, "
          f"{m['train_args']}); NVLink {m['nvlink_gbs']:.0f} GB/s, IB {m['ib_gbs']:.0f} GB/s")
    print(f"{'GPUs':>5}{'EP':>4}{'rows/token: node':>17}{'other nodes':>12}{'(nodes)':>8}{'a2a ms':>8}"
          f"{'(dedup)':>8}{'FSDP ms':>8}{'as built':>9}{'overlapped':>11}{'+ dedup':>8}")
    for r in m["rows"]:
        print(f"{r['gpus']:>5}{r['ep']:>4}{r['rows_per_token_intra']:>17.2f}{r['rows_per_token_inter']:>12.2f}"
              f"{r['nodes_per_token_inter']:>8.2f}{r['alltoall_ms']:>8.1f}{r['alltoall_node_dedup_ms']:>8.1f}"
              f"{r['fsdp_ms']:>8.1f}{r['efficiency_as_built']:>9.0%}{r['efficiency_overlapped']:>11.0%}"
              f"{r['efficiency_overlapped_node_dedup']:>8.0%}")


def figure(out: dict) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, m in out.items():
        n = [r["gpus"] for r in m["rows"]]
        line, = ax.plot(n, [r["efficiency_as_built"] for r in m["rows"]], "o-", label=f"{name}, as built")
        ax.plot(n, [r["efficiency_overlapped"] for r in m["rows"]], "s--", color=line.get_color(),
                label=f"{name}, communication overlapped")
        ax.plot(n, [r["efficiency_overlapped_node_dedup"] for r in m["rows"]], "^:", color=line.get_color(),
                label=f"{name}, overlapped, IB once per node")
    ax.set(xscale="log", xlabel="GPUs (8 per node)", ylabel="modelled scaling efficiency (weak)", ylim=(0, 1.05),
           title="dsv3 train, EP = min(GPUs, experts) + FSDP2: model from a 1-GPU step")
    ax.set_xticks(n, [str(g) for g in n])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="8,16,32,64,128,256,1024", help="comma-separated GPU counts")
    p.add_argument("--nvlink-gbs", type=float, default=0.0,
                   help="GB/s per GPU within a node (default: measured by benchmarks/scaling/layouts.py, else 160)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU between nodes")
    args = p.parse_args()
    measured = measured_alltoall()
    nvlink = args.nvlink_gbs or (max(r["gb_per_s_out_of_each_rank"] for r in measured) if measured else 160.0)
    out = {}
    for name, run in RUNS.items():
        d = load(run)
        tokens = d["args"]["batch_size"] * d["args"]["seq_len"]
        t_c = tokens / d["results"]["runs"][name]["1 GPU"]["tokens_per_s"]
        cfg = CONFIGS[name]().replace(vocab_size=d["args"]["model_vocab_size"])
        params = param_counts(cfg)
        rows = [step_estimate(cfg, params, t_c, tokens, int(n), nvlink, args.ib_gbs) for n in args.gpus.split(",")]
        out[name] = {"from": run, "device": d["device"], "train_args": d["args"]["train_args"],
                     "tokens_per_gpu": tokens,
                     "nvlink_gbs": nvlink, "nvlink_measured": bool(measured) and not args.nvlink_gbs,
                     "ib_gbs": args.ib_gbs, "rows": rows}
        print_rows(name, out[name], t_c)
    save(__file__, args, out, figure=figure(out))


if __name__ == "__main__":
    main()
