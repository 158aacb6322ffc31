"""Pretraining text: the shipped Shakespeare corpus, or the user's .txt / .jsonl / .parquet files, directories of
them, and Hugging Face `datasets` folders (dsv3/data/arrow.py reads the last two).

Design notes
- A corpus is a stream of documents (str). Document boundaries matter downstream: each becomes BOS…EOS in the
  token file, the validation split and FIM are decided per document, and the model restarts attention at BOS.
- Paths, and the schema of every Parquet / Arrow file, are checked eagerly (a typo or a wrong --text-column fails
  at the call, not minutes later inside tokenizer training); the text is read lazily, so a corpus larger than
  memory streams through BPE training and tokenization.
- `text_column` names the field of a .jsonl record and the column of a Parquet / datasets file that holds the
  document; it applies to the user's files, never to the shipped corpus (whose field is "text").
- `.txt` is one document per file, except files over 1 MB (a whole book dump, a log) which are cut at blank-line
  runs into ~16 KB documents: one multi-megabyte document would put every FIM cut and the whole validation
  split into a single unit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
from collections.abc import Iterator
from pathlib import Path

from dsv3.data import arrow

SHIPPED = Path(__file__).parent / "corpus" / "shakespeare.jsonl.xz"
SUFFIXES = (".txt", ".jsonl", ".txt.xz", ".txt.gz", ".jsonl.xz", ".jsonl.gz", ".parquet")
COLUMNAR = (".parquet", ".arrow")  # .arrow: the shards of a datasets folder, never taken on their own
TEXT_COLUMN = "text"
BIG_TXT_CHARS = 1_000_000  # a .txt longer than this is split into documents of about...
DOC_CHARS = 16_000  # ...this many characters, at blank-line runs
# Bump when the way files become documents changes, so token files cached under the old rule are rebuilt.
_FORMAT = 1


def read_documents(paths: list[str | Path] | None, text_column: str = TEXT_COLUMN) -> Iterator[str]:
    """Non-empty documents of `paths` (files or directories) in a fixed order; None = the shipped corpus.
    Raises FileNotFoundError / ValueError here for bad paths and for Parquet / Arrow files that cannot be read or
    lack `text_column`; ValueError("no text found ...") at the end of iteration if nothing non-empty was read."""
    files = list_files(paths)
    if not files:
        raise ValueError(f"no text found in {_show(paths)}: no {'/'.join(SUFFIXES)} files or datasets folders")
    column = TEXT_COLUMN if paths is None else text_column
    for f in files:
        if f.suffix in COLUMNAR:
            arrow.check_text_column(f, column)
    return _documents(files, paths, column)


def list_files(paths: list[str | Path] | None) -> list[Path]:
    # Directories expand recursively in sorted order so the document order (hence the split and the FIM draws,
    # both keyed by document index) is the same on every machine; a datasets folder expands to its shards.
    if paths is None:
        paths = [SHIPPED]
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a lone path instead of a list is an easy mistake; take it
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += _walk(p)
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise ValueError(f"{p}: unsupported file type, expected one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    return files


def _walk(folder: Path) -> list[Path]:
    # Depth-first over sorted names: the order of sorted(folder.rglob("*")), which does not follow symlinked
    # folders either; a datasets folder met on the way is its shards, not a folder of .arrow files to skip.
    if arrow.is_dataset_dir(folder):
        return arrow.dataset_files(folder)
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink():
            files += _walk(p)
        elif p.is_file() and p.name.endswith(SUFFIXES):
            files.append(p)
    return files


def corpus_fingerprint(paths: list[str | Path] | None, text_column: str = TEXT_COLUMN) -> str:
    """Hash of the resolved files, sizes and mtimes, and of the text column: the key under which a token file is
    cached. Cheap (no reading), and touching or editing any file invalidates the cache."""
    h = hashlib.sha256(f"corpus-format-{_FORMAT}".encode())
    if paths is not None and text_column != TEXT_COLUMN:  # hashed only when not the default, so token files
        h.update(f"\0column\0{text_column}".encode())  # cached before the option existed stay valid
    for f in list_files(paths):
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def split_at_blank_lines(text: str, target: int = DOC_CHARS) -> list[str]:
    """Cut `text` at blank-line runs into pieces of about `target` characters (a piece grows until it reaches
    `target`; one paragraph longer than that stays whole; a tail under target/4 joins the piece before it). The
    blank lines at a cut are dropped."""
    parts = re.split(r"(\n[ \t]*\n\s*)", text)  # [para, sep, para, sep, ..., para]
    docs, cur, sep = [], "", ""
    for i in range(0, len(parts), 2):
        cur += parts[i]
        if len(cur) >= target or i + 1 >= len(parts):
            if docs and len(cur) < target // 4 and i + 1 >= len(parts):
                docs[-1] += sep + cur
            else:
                docs.append(cur)
            cur, sep = "", parts[i + 1] if i + 1 < len(parts) else ""
        else:
            cur += parts[i + 1]
    return [d for d in docs if d.strip()]


def _open_text(f: Path):
    # Text mode with newline=None turns \r\n and \r into \n; utf-8 strictly, so a Latin-1 file fails loudly
    # (with the file named, below) instead of training a tokenizer on mojibake.
    name = f.name
    if name.endswith(".xz"):
        return lzma.open(f, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(f, "rt", encoding="utf-8")
    return open(f, encoding="utf-8")


def _file_documents(f: Path, column: str) -> Iterator[str]:
    if f.suffix in COLUMNAR:
        yield from arrow.iter_texts(f, column)
        return
    stem = f.name.removesuffix(".xz").removesuffix(".gz")
    try:
        with _open_text(f) as fh:
            if stem.endswith(".txt"):
                text = fh.read()
                yield from split_at_blank_lines(text) if len(text) > BIG_TXT_CHARS else [text]
                return
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e})") from e
                if not isinstance(record, dict) or not isinstance(record.get(column), str):
                    has = f" (it has {sorted(record)})" if isinstance(record, dict) else ""
                    raise ValueError(f'{f}:{lineno}: expected an object with a string "{column}" field{has}')
                yield record[column]
    except (UnicodeDecodeError, EOFError, lzma.LZMAError, gzip.BadGzipFile) as e:
        raise ValueError(f"{f}: cannot read as UTF-8 text ({e})") from e


def _documents(files: list[Path], paths, column: str) -> Iterator[str]:
    found = False
    for f in files:
        for doc in _file_documents(f, column):
            if doc.strip():
                found = True
                yield doc
    if not found:
        raise ValueError(f"no text found in {_show(paths)}")


def _show(paths) -> str:
    return str(SHIPPED) if paths is None else str([str(p) for p in paths] if isinstance(paths, list) else paths)
