"""What `dsv3 train` would reach on 8, 64, 256 and 1024 GPUs (8 per node), from a measured one-GPU step and the
communication our parallel code does, and where it stops scaling. The written model is in benchmarks/README.md.

Weak scaling, as in bench_scale.py: every GPU keeps the 1-GPU batch of T tokens and its compute time t_c (from a
bench_scale JSON). On N GPUs the routed experts are split over EP = min(N, experts) ranks (the rest is data
parallel: FSDP2 over all N for the dense weights, over the N / EP replicas for the experts). Per step and GPU:
  all-to-all   per MoE layer, forward dispatch + combine and their mirror in backward (EPExperts): each token
               goes once to each other rank that holds one of its experts, a row of D + 2K bf16 values out and D
               back. Rows per token to ranks on the same node and on other nodes are counted by running our
               router (dsv3.model.moe.Gate, random weights and inputs: balanced load) on the layout; time =
               max(intra-node bytes / NVLink, inter-node bytes / IB), the two links working at once.
  FSDP2        all-gather of the bf16 weights in forward and again in backward, reduce-scatter of the gradients:
               3 · 2 bytes · params · (n − 1) / n per GPU, over IB once the group spans nodes.
Three schedules: "as built" (the all-to-all runs inside the layer, exposed; FSDP2 prefetch hides the collectives up
to t_c), "overlapped" (DualPipe-style: another micro-batch's compute hides communication up to t_c), and overlapped
with each token crossing IB once per destination node (DeepSeek-V3's dispatch), then NVLink there.
Efficiency = t_c / step time. Bandwidths: the all-to-all bandwidth bench_scale.py measured on a multi-GPU machine
where its JSON has one, else DeepSeek-V3's figures (§3.2.2 of the paper: NVLink 160 GB/s, IB 50 GB/s per GPU).

    python benchmarks/scaling_model.py            # the 1-GPU runs in benchmarks/results
Writes benchmarks/results/scaling_model.json and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsv3.config import preset  # noqa: E402
from dsv3.train.scaling import param_counts, step_estimate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONFIGS = {"bench-684m": lambda: preset("bench-684m"),  # as bench_scale.py runs them (MTP off)
           "v2lite-8l": lambda: preset("deepseek-v2-lite").replace(num_hidden_layers=8)}
RUNS = {"bench-684m": "bench_scale_1xcuda_bench-684m_compiled.json",  # the 1-GPU runs each model's t_c comes from
        "v2lite-8l": "bench_scale_1xcuda_h200_v2lite-8l.json"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="8,16,32,64,128,256,1024")
    p.add_argument("--nvlink-gbs", type=float, default=0.0, help="default: measured (bench_scale JSON), else 160")
    p.add_argument("--ib-gbs", type=float, default=50.0)
    args = p.parse_args()
    measured = [r for f in RESULTS.glob("bench_scale_*xcuda*.json")  # GPUs' NVLink, not a CPU's gloo
                if isinstance(a := json.loads(f.read_text()).get("alltoall"), list) for r in a]
    nvlink = args.nvlink_gbs or (max(r["gb_per_s_out_of_each_rank"] for r in measured) if measured else 160.0)
    out = {}
    for name, run in RUNS.items():
        d = json.loads((RESULTS / run).read_text())
        tokens = d["args"]["batch_size"] * d["args"]["seq_len"]
        t_c = tokens / d["results"][name]["1 GPU"]["tokens_per_s"]
        cfg = CONFIGS[name]().replace(vocab_size=d["args"]["model_vocab_size"])
        params = param_counts(cfg)
        rows = [step_estimate(cfg, params, t_c, tokens, int(n), nvlink, args.ib_gbs) for n in args.gpus.split(",")]
        out[name] = {"from": run, "device": d["device"], "train_args": d["args"]["train_args"],
                     "tokens_per_gpu": tokens,
                     "nvlink_gbs": nvlink, "nvlink_measured": bool(measured) and not args.nvlink_gbs,
                     "ib_gbs": args.ib_gbs, "rows": rows}
        print(f"\n{name}: {tokens} tokens per GPU, t_c {1e3 * t_c:.1f} ms ({d['device']}, "
              f"{d['args']['train_args']}); NVLink {nvlink:.0f} GB/s, IB {args.ib_gbs:.0f} GB/s")
        print(f"{'GPUs':>5}{'EP':>4}{'rows/token: node':>17}{'other nodes':>12}{'(nodes)':>8}{'a2a ms':>8}"
              f"{'(dedup)':>8}{'FSDP ms':>8}{'as built':>9}{'overlapped':>11}{'+ dedup':>8}")
        for r in rows:
            print(f"{r['gpus']:>5}{r['ep']:>4}{r['rows_per_token_intra']:>17.2f}{r['rows_per_token_inter']:>12.2f}"
                  f"{r['nodes_per_token_inter']:>8.2f}{r['alltoall_ms']:>8.1f}{r['alltoall_node_dedup_ms']:>8.1f}"
                  f"{r['fsdp_ms']:>8.1f}{r['efficiency_as_built']:>9.0%}{r['efficiency_overlapped']:>11.0%}"
                  f"{r['efficiency_overlapped_node_dedup']:>8.0%}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling_model.json").write_text(json.dumps(out, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in out.items():
        n = [r["gpus"] for r in m["rows"]]
        line, = ax.plot(n, [r["efficiency_as_built"] for r in m["rows"]], "o-", label=f"{name}, as built")
        ax.plot(n, [r["efficiency_overlapped"] for r in m["rows"]], "s--", color=line.get_color(),
                label=f"{name}, communication overlapped")
        ax.plot(n, [r["efficiency_overlapped_node_dedup"] for r in m["rows"]], "^:", color=line.get_color(),
                label=f"{name}, overlapped, IB once per node")
    ax.set(xscale="log", xlabel="GPUs (8 per node)", ylabel="modelled scaling efficiency (weak)", ylim=(0, 1.05),
           title="dsv3 train, EP = min(GPUs, experts) + FSDP2: model from a 1-GPU step")
    ax.set_xticks([r["gpus"] for r in rows], [str(r["gpus"]) for r in rows])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(RESULTS / "scaling_model.png", dpi=110, bbox_inches="tight")
    print(f"wrote {RESULTS / 'scaling_model.json'} and .png")


if __name__ == "__main__":
    main()
