"""What a `dsv3 train` step costs in communication on N GPUs (8 per node), from what our parallel code sends: a
model of weak scaling, written up in docs/scaling.md and run by `python -m benchmarks.scaling.model`.

Every GPU keeps the 1-GPU batch of T tokens and its compute time t_c. The routed experts are split over
EP = min(N, experts) ranks; the rest is data parallel (FSDP2 over all N GPUs for the dense weights, over the N / EP
replicas for the experts). Per step and GPU:
  all-to-all   per MoE layer, forward dispatch + combine and their mirror in backward (train/parallel.py's
               EPExperts): a token goes once to each other rank holding one of its experts, a row of D + 2K bf16
               values out and D back. Rows per token to ranks on the same node and on other nodes are counted by
               running our router (dsv3.model.moe.Gate, random weights and inputs: balanced load) over the layout;
               time = max(intra-node bytes / NVLink, inter-node bytes / IB), the two links working at once.
  FSDP2        all-gather of the bf16 weights in forward and again in backward, reduce-scatter of the gradients:
               3 · 2 bytes · params · (n − 1) / n per GPU, over IB once the group spans nodes.
Three schedules: "as built" (the all-to-all runs inside the layer, exposed; FSDP2's prefetch hides its collectives
up to t_c), "overlapped" (DualPipe-style: another micro-batch's compute hides communication up to t_c), and
overlapped with each token crossing IB once per destination node (DeepSeek-V3's dispatch), then NVLink there.
Efficiency = t_c / step time.
"""
from __future__ import annotations

import torch

from dsv3.model.moe import Experts, Gate
from dsv3.model.transformer import Transformer


def rows_per_token(cfg, ep: int, per_node: int, samples: int = 8192) -> tuple[float, float, float]:
    """Mean other ranks a token is sent to on its own node and on other nodes, and the mean other nodes it reaches
    (origin: a uniformly random rank)."""
    g = torch.Generator().manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=cfg.hidden_size ** -0.5, generator=g)
    with torch.no_grad():
        _, idx, _ = gate(torch.randn(samples, cfg.hidden_size, generator=g))
    dest = idx // (cfg.n_routed_experts // ep)  # (tokens, K) destination ranks
    src = torch.randint(0, ep, (samples, 1), generator=g)
    ranks = torch.zeros(samples, ep, dtype=torch.bool).scatter_(1, dest, True)
    ranks[torch.arange(samples), src[:, 0]] = False  # rows for its own rank stay on the GPU
    node = torch.arange(ep) // per_node
    same = node[None, :] == (src // per_node)
    far = ranks & ~same
    nodes = far.unflatten(1, (-1, per_node)).any(-1).sum(1)  # ranks are numbered node by node
    return tuple(x.float().mean().item() for x in ((ranks & same).sum(1), far.sum(1), nodes))


def param_counts(cfg) -> tuple[int, int]:
    """(dense parameters, routed-expert parameters) of the model, MTP off."""
    with torch.device("meta"):
        model = Transformer(cfg.replace(num_nextn_predict_layers=0))
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - experts, experts


def step_estimate(cfg, params: tuple[int, int], t_c: float, tokens: int, n: int, nvlink: float, ib: float,
                  per_node: int = 8) -> dict:
    """Milliseconds per step of each part for one GPU of N, and the three schedules' efficiencies. `params`:
    param_counts(cfg); `t_c`: the 1-GPU step's seconds; `nvlink`, `ib`: GB/s per GPU."""
    E, K, D = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    ep = min(n, E)
    per_node = min(per_node, n)
    intra, inter, nodes = rows_per_token(cfg, ep, per_node)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    bytes_per_row = 2 * (2 * D + 2 * K) * 2  # dispatch (D + 2K) and combine (D), bf16, forward and backward
    a2a = moe_layers * tokens * bytes_per_row * max(intra / nvlink, inter / ib) / 1e9
    # DeepSeek-V3's dispatch: over IB once per node, then NVLink on to the other ranks there
    a2a_node = moe_layers * tokens * bytes_per_row * max((intra + inter - nodes) / nvlink, nodes / ib) / 1e9
    dense, experts = params
    fsdp = 0.0
    for count, group in ((dense, n), (experts / ep, n // ep)):  # expert replicas: ranks EP apart
        fsdp += 3 * 2 * count * (group - 1) / group / (ib if n > per_node else nvlink) / 1e9
    return {"gpus": n, "ep": ep, "dp_experts": n // ep, "rows_per_token_intra": intra, "rows_per_token_inter": inter,
            "nodes_per_token_inter": nodes, "alltoall_ms": 1e3 * a2a, "alltoall_node_dedup_ms": 1e3 * a2a_node,
            "fsdp_ms": 1e3 * fsdp, "compute_ms": 1e3 * t_c,
            "efficiency_as_built": t_c / (t_c + a2a + max(0.0, fsdp - t_c)),
            "efficiency_overlapped": t_c / max(t_c, a2a + fsdp),
            "efficiency_overlapped_node_dedup": t_c / max(t_c, a2a_node + fsdp)}
