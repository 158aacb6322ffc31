"""Inference: the engine's transform of a built model (transform.py: paged attention, fused projections), paged
latent KV cache, scheduler, engine, sampling, MTP speculation, prefix cache, CUDA graphs."""
