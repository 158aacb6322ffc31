"""Pretraining data: corpus → tokenizer (BPE) → memory-mapped token files → packed, resumable batches."""

from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import SHIPPED, corpus_fingerprint, read_documents
from dsv3.data.loader import Batch, PackedLoader
from dsv3.data.tokens import TokenFile, build_token_files, unigram_loss

__all__ = [
    "SHIPPED", "Batch", "PackedLoader", "TokenFile", "build_token_files", "corpus_fingerprint", "read_documents",
    "train_bpe", "unigram_loss",
]
