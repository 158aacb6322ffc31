"""Train a byte-level BPE tokenizer with DeepSeek's special tokens reserved, so our chat, tool, FIM and <think>
formats (dsv3/tokenizer.py) work unchanged on a model trained from scratch.

Design notes
- Byte-level BPE (GPT-2 pre-tokenizer regex + byte alphabet) as DeepSeek uses: any UTF-8 text encodes, there is no
  unknown token, and decode(encode(x)) == x. The 256 byte symbols are seeded as the initial alphabet so every
  byte has an id even if the training text never contains it.
- The special tokens take ids 0..17 in SPECIAL_TOKENS order (BOS=0, EOS=1 as in DeepSeek's vocabulary); the learned
  merges follow. As in DeepSeek's tokenizer.json only BOS/EOS are flagged `special` (dropped by
  decode(skip_special_tokens=True)); chat, tool, FIM and think markers are plain added tokens, so a server that
  skips special tokens still shows <think> and tool-call markers to its parsers.
- No post-processor that adds BOS: pretraining and chat templates write BOS themselves (see tokenizer.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3.tokenizer import BOS, EOS, SPECIAL_TOKENS, Tokenizer

MIN_VOCAB = 512  # 256 byte symbols + 18 specials leave too few merges below this to be worth training


def train_bpe(documents: Iterable[str], vocab_size: int, model_max_length: int = 131072) -> Tokenizer:
    """`vocab_size` counts specials, bytes and merges; a small corpus may stop short of it (Tokenizer.vocab_size
    reports the real size). `model_max_length` goes to tokenizer_config.json (transformers' truncation limit):
    pass the model's context length."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum of {MIN_VOCAB} for a byte-level BPE")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    # A ValueError from the corpus reader (e.g. "no text found") comes back out of the Rust loop unchanged.
    tok.train_from_iterator(documents, trainer)
    tok = _unflag_markers(tok)
    for i, t in enumerate(SPECIAL_TOKENS):  # the trainer reserves them first; the model's BOS/EOS ids rely on it
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,  # DeepSeek pads with EOS too
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # else transformers' decode would rewrite " ," and break round trips
    }  # fmt: skip
    # No chat_template on purpose: Tokenizer then renders the built-in DeepSeek-V3 format.
    return Tokenizer(tok, config)


def _unflag_markers(tok: HFTokenizer) -> HFTokenizer:
    # The trainer adds every reserved token with special=True; DeepSeek flags only BOS/EOS (and placeholders).
    # There is no setter for the flag, so edit the serialized form and reload it.
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] in (BOS, EOS)
    return HFTokenizer.from_str(json.dumps(data, ensure_ascii=False))
