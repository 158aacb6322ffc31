"""Inference: paged latent KV cache, scheduler, engine, sampling."""
