"""dsv3: DeepSeek-V3 in PyTorch — model, training, post-training, inference and serving."""
from dsv3.config import ModelConfig, preset
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.llm import LLM
from dsv3.infer.sampler import SamplingParams
from dsv3.io import load_model, save_model
from dsv3.model import Transformer

__all__ = ["ModelConfig", "preset", "Transformer", "load_model", "save_model", "LLM", "SamplingParams", "Engine",
           "EngineConfig"]
