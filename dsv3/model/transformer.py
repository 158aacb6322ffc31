"""The decoder: embedding → L blocks (MLA + dense FFN or MoE) → final norm → untied head, plus D MTP modules.

Parameter names equal the Hugging Face checkpoint names below `model.` (`layers.3.self_attn.kv_b_proj.weight`),
so the name table in `dsv3/io/hf.py` stays small: it adds the prefix, splits the stacked experts into
per-expert tensors and maps `mtp.k.*` to `model.layers.{L+k}.*` (docs/architecture.md#checkpoint-layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, MoE
from dsv3.model.norm import RMSNorm
from dsv3.model import rope


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None):
        """-> hidden states, and for a MoE block (tokens per expert, balance loss value or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, counts, bal = self.mlp(h)
            return x + y, (counts, bal)
        return x + self.mlp(h), None


class SharedHead(nn.Module):
    """MTP's own final norm; the head matrix itself is the main model's lm_head
    (docs/architecture.md#mtp-at-inference)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """MTP module k (docs/architecture.md#multi-token-prediction):
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), then a MoE block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Input order [embedding ; hidden], as the released checkpoint, transformers, vLLM and SGLang use it
        # (the paper writes the reverse).
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, mask=None, cache=None):
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        return super().forward(x, cos, sin, mask, cache)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V), or (rows, V) with a cache
    hidden: torch.Tensor  # final-normed hidden states, the input of MTP depth 1
    mtp_logits: list[torch.Tensor]  # depth k: (B, T-k, V), predicting token i+k+1 at position i
    expert_counts: torch.Tensor | None  # (MoE layers incl. MTP, E) tokens routed to each expert
    balance_loss: torch.Tensor | None  # Σ over layers of the sequence-wise balance loss (without α), detached


def document_positions_and_mask(doc_ids: torch.Tensor):
    """Packed sequences: positions restart per document; attention stays causal within a document.

    doc_ids (B, T) of non-decreasing document numbers -> positions (B, T), bool mask (B, 1, T, T).
    """
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.cat((torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device),
                        doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1)
    start_t = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return t - start_t, (same_doc & causal).unsqueeze(1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self.register_buffer("rope_inv_freq", rope.inv_freq(cfg), persistent=False)
        self.rope_factor = rope.attention_factor(cfg)

    def _apply(self, fn, recurse=True):
        # Buffers are fp32 state (rope frequencies, the balance bias): `model.to(torch.bfloat16)` moves them
        # but must not round them (bf16 frequencies put cos off by up to 0.36 at position 2048).
        fp32 = {n: b for n, b in self.named_buffers() if b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in fp32.items():
            module, _, attr = name.rpartition(".")
            owner = self.get_submodule(module)
            new = getattr(owner, attr)
            if new.dtype != torch.float32:
                setattr(owner, attr, (new if old.is_meta else old).to(new.device, torch.float32))
        return self

    # ---- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """N(0, std) for every matrix and embedding (V3: 0.006), ones for norms, zeros for balance biases."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rope frequencies from the config, balance biases at zero (also after building on the meta device)."""
        self.rope_inv_freq = rope.inv_freq(self.config).to(self.embed_tokens.weight.device)
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """MoE modules in forward order (main layers, then MTP): the rows of ModelOutput.expert_counts."""
        return [b.mlp for b in (*self.layers, *self.mtp) if isinstance(getattr(b, "mlp", None), MoE)]

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache=None, mtp: bool = False) -> ModelOutput:
        """Training / full-sequence: input_ids (B, T), optional doc_ids (B, T) for packed documents.

        With the inference engine's paged cache (dsv3/infer/paged_kv.py: PagedKV, attended over by the engine's
        MLA after dsv3.infer.transform.prepare_for_engine): input_ids (T,) flattened over sequences, positions (T,)
        required; logits only for `cache.logits_indices` rows when given.
        """
        routes = []  # per MoE block: (tokens per expert, balance loss or None)
        mask = None
        if cache is not None:
            if positions is None:
                raise ValueError("positions are required with a cache")
            if mtp:
                raise ValueError("MTP with a cache runs through the inference engine, not forward(mtp=True)")
        elif doc_ids is not None:
            positions, mask = document_positions_and_mask(doc_ids)
        elif positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        cos, sin = rope.cos_sin(positions, self.rope_inv_freq, self.rope_factor)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h, route = layer(h, cos, sin, mask, cache)
            routes.append(route)
        h = self.norm(h)
        out_h = h if cache is None or cache.logits_indices is None else h[cache.logits_indices]
        mtp_logits = self._mtp(input_ids, h, cos, sin, mask, routes) if mtp else []
        routes = [r for r in routes if r is not None]
        counts = torch.stack([c for c, _ in routes]) if routes else None
        bals = [b for _, b in routes if b is not None]
        bal = torch.stack(bals).sum() if bals else None
        return ModelOutput(self.lm_head(out_h), h, mtp_logits, counts, bal)

    def draft(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache,
              depth: int = 1) -> torch.Tensor:
        """MTP module `depth` over a flat batch with its own paged latent cache (inference:
        docs/architecture.md#mtp-at-inference): row i holds the main model's final-normed hidden h_i at
        `positions[i]` and the token t_{i+1} that followed it; returns logits for t_{i+2} at `cache.logits_indices`
        rows."""
        layer = self.mtp[depth - 1]
        cos, sin = rope.cos_sin(positions, self.rope_inv_freq, self.rope_factor)
        h, _ = layer(hidden, self.embed_tokens(next_ids), cos, sin, None, cache)
        h = h if cache.logits_indices is None else h[cache.logits_indices]
        return self.lm_head(layer.shared_head.norm(h))

    def _mtp(self, input_ids, h, cos, sin, mask, routes):
        logits = []
        T = input_ids.shape[1]
        for k, layer in enumerate(self.mtp, start=1):
            n = T - k  # depth k predicts token i+k+1 from h^{k-1}_i and token i+k, for i < T-k
            m = None if mask is None else mask[:, :, :n, :n]
            h, route = layer(h[:, :n], self.embed_tokens(input_ids[:, k:]), cos[:, :n], sin[:, :n], m)
            routes.append(route)
            logits.append(self.lm_head(layer.shared_head.norm(h)))
        return logits
