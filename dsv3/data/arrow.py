"""Parquet files and Hugging Face `datasets` folders, read with pyarrow (the optional `data` extra).

Design notes
- pyarrow is imported on first use, not with dsv3.data: .txt / .jsonl corpora, token files, SFT on JSONL and the
  server never need it, so a plain `pip install -e .` has no use for it.
- A `datasets` folder is what `Dataset.save_to_disk` writes: `state.json` lists the shards in order under
  `_data_files` ([{"filename": "data-00000-of-00002.arrow"}, ...]); each shard is an Arrow IPC *stream* (not the
  random-access IPC file format) of record batches of at most 1000 rows, with the features in the schema's
  "huggingface" metadata; `dataset_info.json` describes the dataset and is not needed to read it. A DatasetDict
  folder holds `dataset_dict.json` ({"splits": ["train", "test"]}) and one such folder per split.
- Text is streamed: Parquet READ_BATCH rows at a time (pyarrow decodes about a row group of the column
  at once), IPC shards memory-mapped one record batch at a time, and only the column asked for is read.
- Every failure names the file: a shard that is missing, a schema without the column (listing the columns it has),
  bytes that are not Parquet / Arrow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

READ_BATCH = 1024  # rows per record batch read from a Parquet file


def _pyarrow():
    # Imported here, lazily, because pyarrow is optional: importing dsv3.data must work without it.
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError('reading Parquet files or datasets folders needs pyarrow: pip install -e ".[data]"') from e
    return pyarrow


def is_dataset_dir(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def dataset_files(folder: Path) -> list[Path]:
    """The shards of a `save_to_disk` folder in order; of a DatasetDict folder, its `train` split's."""
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise ValueError(f"{folder} is a DatasetDict with splits {splits} and no 'train': pass the folder of the "
                             f"split to read (e.g. {folder / splits[0] if splits else folder / 'SPLIT'})")
        folder = folder / "train"
    state = _json(folder / "state.json")
    if not isinstance(state.get("_data_files"), list):
        raise ValueError(f"{folder / 'state.json'}: no '_data_files' list of shards (not a save_to_disk folder?)")
    files = [folder / entry["filename"] for entry in state["_data_files"]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: a shard that {folder / 'state.json'} lists does not exist")
    return files


def columns(f: Path) -> list[str]:
    return _schema(f).names


def check_text_column(f: Path, column: str) -> None:
    """Raise here, naming the file, if `f` cannot be read or has no string column `column`."""
    pa, schema = _pyarrow(), _schema(f)
    if column not in schema.names:
        raise ValueError(f"{f}: no column {column!r} (it has {schema.names}); choose one with --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{f}: column {column!r} holds {kind}, not text")


def iter_texts(f: Path, column: str) -> Iterator[str]:
    """The non-null values of a string column, streamed record batch by record batch."""
    pa = _pyarrow()
    try:
        if f.suffix == ".parquet":
            batches = pa.parquet.ParquetFile(f).iter_batches(batch_size=READ_BATCH, columns=[column])
        else:
            batches = pa.ipc.open_stream(pa.memory_map(str(f)))
        for batch in batches:
            yield from (t for t in batch.column(column).to_pylist() if t is not None)  # null: no document
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f}: cannot read as {_kind(f)} ({e})") from None


def read_rows(f: Path, names: list[str]) -> list[dict]:
    """Every row of `names` columns as dicts (lists and structs become Python lists and dicts)."""
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(f, columns=names).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f}: cannot read as {_kind(f)} ({e})") from None


def _schema(f: Path):
    pa = _pyarrow()
    try:
        if f.suffix == ".parquet":
            return pa.parquet.read_schema(f)
        with pa.ipc.open_stream(pa.memory_map(str(f))) as reader:  # reads the stream's first message only
            return reader.schema
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f}: cannot read as {_kind(f)} ({e})") from None


def _kind(f: Path) -> str:
    return "Parquet" if f.suffix == ".parquet" else "an Arrow IPC stream (a datasets shard)"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
