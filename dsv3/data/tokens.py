"""Documents → two flat token files (train.bin, val.bin), memory-mapped, built once per corpus + tokenizer.

Design notes
- Layout: every document is `[BOS] text [EOS]`, documents back to back, no padding; the loader cuts fixed
  windows from this stream and the model restarts attention at each BOS (nanoGPT's train.bin, plus boundaries).
- uint16 when every id fits (vocab ≤ 65536), else uint32: half the disk and page cache for small vocabularies.
- Fill-in-the-middle (DeepSeek-V3 report §4.1: PSM at document level, rate 0.1): a train document is cut at two random
  character positions and rewritten `[BOS, FIM_BEGIN] prefix [FIM_HOLE] suffix [FIM_END] middle [EOS]`, so the model
  learns to write the middle after seeing both sides. Validation documents never get FIM: val loss stays plain
  next-token loss, comparable across fim_rate settings.
- Every random choice (val membership, FIM yes/no, cut points) is a hash of (seed, document index, purpose), not a
  stream of draws: the build is deterministic, and one document's draws do not depend on the others.
- Cache: tokens.json records the corpus fingerprint, the tokenizer hash and every setting; a later build with the
  same key reuses the files. A rebuild deletes tokens.json first and writes it last, so an interrupted rebuild
  can never be mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsv3.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer

_FORMAT = 1  # bump when the file layout or the FIM / split rules change
ENCODE_BATCH = 256  # documents per encode_batch call (the Rust side parallelises across them)


@dataclass
class TokenFile:
    path: Path
    tokens: np.ndarray  # (N,) read-only np.memmap, uint16 or uint32
    n_docs: int

    def __len__(self) -> int:
        return len(self.tokens)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    # The sha256 of the tokenizer.json that Tokenizer.save writes (its serialization), so a retrained tokenizer
    # with different merges, or another tokenizer entirely, never reuses ids it did not produce.
    return hashlib.sha256(tokenizer.tok.to_str().encode("utf-8")).hexdigest()


def build_token_files(
    documents: Iterable[str], tokenizer: Tokenizer, out_dir: Path, fingerprint: str,
    val_fraction: float = 0.02, fim_rate: float = 0.1, seed: int = 0,
) -> tuple[TokenFile, TokenFile]:  # fmt: skip
    """(train, val) token files in `out_dir`; reused without reading `documents` when tokens.json matches."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not 0.0 <= fim_rate <= 1.0:
        raise ValueError(f"fim_rate={fim_rate} must be in [0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    key = {
        "format": _FORMAT, "fingerprint": fingerprint, "tokenizer_sha256": tokenizer_hash(tokenizer), "dtype": dtype,
        "val_fraction": val_fraction, "fim_rate": fim_rate, "seed": seed,
    }  # fmt: skip
    meta_file = out_dir / "tokens.json"
    if (files := _reuse(out_dir, key)) is not None:
        return files
    meta_file.unlink(missing_ok=True)  # invalidate before touching the .bin files
    tmp = {s: out_dir / f"{s}.bin.{os.getpid()}.tmp" for s in ("train", "val")}  # pid: concurrent builders
    try:
        counts = _write(documents, tokenizer, tmp, np.dtype(dtype), val_fraction, fim_rate, seed)
        for split, path in tmp.items():
            os.replace(path, out_dir / f"{split}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    meta_tmp = out_dir / f"tokens.json.{os.getpid()}.tmp"
    meta_tmp.write_text(json.dumps(key | counts, indent=2))
    os.replace(meta_tmp, meta_file)
    return _open(out_dir, key | counts)


def is_token_dir(path: str | Path) -> bool:
    return (Path(path) / "tokens.json").is_file()


def open_token_files(out_dir: str | Path, tokenizer: Tokenizer) -> tuple[TokenFile, TokenFile]:
    """A data directory built before (a run's `data/`, carried to another machine): train on it as is."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "tokens.json").read_text())
    if meta.get("tokenizer_sha256") != tokenizer_hash(tokenizer):
        raise ValueError(f"{out_dir}: these token files were built with another tokenizer; pass the tokenizer "
                         "directory of the run that built them (--tokenizer RUN/tokenizer)")
    files = _reuse(out_dir, {k: meta[k] for k in ("format", "dtype")})
    if files is None:
        raise ValueError(f"{out_dir}: token files are missing, truncated or of another format than tokens.json says")
    return files


def _reuse(out_dir: Path, key: dict) -> tuple[TokenFile, TokenFile] | None:
    try:
        meta = json.loads((out_dir / "tokens.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if any(meta.get(k) != v for k, v in key.items()):
        return None
    itemsize = np.dtype(key["dtype"]).itemsize
    for split in ("train", "val"):  # a truncated or replaced .bin file means the cache is not what it claims
        f = out_dir / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return None
    return _open(out_dir, meta)


def _open(out_dir: Path, meta: dict) -> tuple[TokenFile, TokenFile]:
    def one(split):
        path = out_dir / f"{split}.bin"
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta[f"{split}_tokens"],))
        return TokenFile(path, tokens, meta[f"{split}_docs"])

    return one("train"), one("val")


def _write(documents, tokenizer: Tokenizer, tmp: dict, dtype, val_fraction, fim_rate, seed) -> dict:
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    fim_ids = [tokenizer.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)] if fim_rate > 0 else None
    if fim_ids is not None and None in fim_ids:
        missing = [t for t, i in zip((FIM_BEGIN, FIM_HOLE, FIM_END), fim_ids) if i is None]
        raise ValueError(f"fim_rate={fim_rate} needs the FIM tokens, and the tokenizer lacks {missing}")
    # encode_batch_fast skips offset tracking (tokenizers >= 0.21). No post-processor: BOS/EOS are added here,
    # and a tokenizer whose post-processor adds BOS itself must not double it.
    encode = getattr(tokenizer.tok, "encode_batch_fast", tokenizer.tok.encode_batch)
    counts = dict.fromkeys(("train_docs", "val_docs", "train_tokens", "val_tokens", "fim_docs"), 0)
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val, \
            tqdm(desc="tokenizing", unit="doc", delay=2.0) as bar:  # delay: only long builds show a bar
        for batch in _chunks(_split(documents, val_fraction, seed), ENCODE_BATCH):
            pieces, layout = [], []  # layout: (is_val, is_fim, index of the first piece)
            for i, text, is_val in batch:
                u_fim, u_a, u_b = _uniforms(seed, i, "fim", 3)
                is_fim = fim_ids is not None and not is_val and u_fim < fim_rate
                layout.append((is_val, is_fim, len(pieces)))
                if is_fim:
                    a, b = sorted(min(int(u * (len(text) + 1)), len(text)) for u in (u_a, u_b))
                    pieces += [text[:a], text[b:], text[a:b]]  # prefix, suffix, middle: PSM order
                else:
                    pieces.append(text)
            enc = [e.ids for e in encode(pieces, add_special_tokens=False)]
            for is_val, is_fim, k in layout:
                if is_fim:
                    begin, hole, end = fim_ids
                    ids = [bos, begin, *enc[k], hole, *enc[k + 1], end, *enc[k + 2], eos]
                else:
                    ids = [bos, *enc[k], eos]
                split = "val" if is_val else "train"
                (f_val if is_val else f_train).write(np.asarray(ids, dtype=dtype).tobytes())
                counts[f"{split}_docs"] += 1
                counts[f"{split}_tokens"] += len(ids)
                counts["fim_docs"] += is_fim
            bar.update(len(batch))
    if (n := counts["train_docs"] + counts["val_docs"]) < 2:
        raise ValueError(f"the corpus has {n} document(s); a train/validation split needs at least 2")
    return counts


def _split(documents: Iterable[str], val_fraction: float, seed: int) -> Iterator[tuple[int, str, bool]]:
    # (index, text, is_val). One document of lookahead, so the last one can be moved to whichever split would
    # otherwise be empty (a tiny corpus, or a val_fraction that no hash fell under).
    n = {True: 0, False: 0}
    held = None
    for i, text in enumerate(documents):
        if held is not None:
            n[held[2]] += 1
            yield held
        held = (i, text, _uniforms(seed, i, "val", 1)[0] < val_fraction)
    if held is not None:
        i, text, is_val = held
        yield i, text, True if n[True] == 0 else False if n[False] == 0 else is_val


def _uniforms(seed: int, index: int, purpose: str, k: int) -> list[float]:
    # k independent uniforms in [0, 1) from a hash: deterministic across machines, numpy versions and runs.
    digest = hashlib.blake2b(f"{seed}/{index}/{purpose}".encode(), digest_size=8 * k).digest()
    return [int.from_bytes(digest[8 * j : 8 * j + 8], "little") / 2**64 for j in range(k)]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def unigram_loss(train: TokenFile, val: TokenFile, vocab_size: int) -> float:
    """Nats per validation token under the training unigram distribution with add-one smoothing:
    p(v) = (count_train(v) + 1) / (N_train + V). A model has learned something once its val loss is below this."""
    train_counts, val_counts = _counts(train, vocab_size), _counts(val, vocab_size)
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(val_counts * log_p).sum() / val_counts.sum())


def _counts(tf: TokenFile, vocab_size: int) -> np.ndarray:
    # In chunks: bincount widens to int64, which for a multi-GB memmap would not fit in memory at once.
    counts = np.zeros(vocab_size, dtype=np.int64)
    step = 1 << 24
    for start in range(0, len(tf.tokens), step):
        c = np.bincount(tf.tokens[start : start + step], minlength=vocab_size)
        if len(c) > vocab_size:
            raise ValueError(f"{tf.path} holds token id {len(c) - 1}, not below vocab_size={vocab_size}")
        counts += c
    return counts
