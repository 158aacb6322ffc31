"""dsv3.data: corpus reading (Parquet and datasets folders against the same documents as JSONL), BPE training,
token files (split, FIM, cache), unigram baseline, packed loader; SFT examples from Parquet against JSONL."""

import gzip
import importlib.util
import json
import lzma
import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv3.cli import main
from dsv3.data import (
    SHIPPED, PackedLoader, TokenFile, build_token_files, corpus_fingerprint, read_documents, train_bpe, unigram_loss,
)
from dsv3.data import arrow as arrow_mod
from dsv3.data import corpus as corpus_mod
from dsv3.rl.sft import read_examples, tokenize_example
from dsv3.train import loop as train_loop
from dsv3.tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def docs():
    return list(read_documents(None))


@pytest.fixture(scope="module")
def tok(docs):
    return train_bpe(docs[:40], 512)  # ~0.5 MB of text: a real BPE in well under a second


# ---- corpus ----------------------------------------------------------------------------------------------------


def test_shipped_corpus_reads_into_documents(docs):
    assert SHIPPED.name == "shakespeare.jsonl.xz" and (SHIPPED.parent / "NOTICE").is_file()
    assert len(docs) >= 100 and all(d.strip() for d in docs)
    assert "To be, or not to be" in "".join(docs)
    assert SHIPPED.stat().st_size < 3_000_000


def test_missing_path_and_empty_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents([tmp_path / "nope.txt"])
    with pytest.raises(ValueError, match="no text found"):  # a directory without any corpus file
        read_documents([tmp_path])
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no text found"):  # files, but only whitespace: found while reading
        list(read_documents([tmp_path]))
    with pytest.raises(ValueError, match="no text found"):  # and it surfaces through BPE training
        train_bpe(read_documents([tmp_path]), 512)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="data.csv"):
        read_documents([tmp_path / "data.csv"])


def test_jsonl_without_text_names_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3"):
        list(read_documents([f]))


def test_reads_txt_jsonl_compressed_and_directories(tmp_path, monkeypatch):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first\r\ndoc")
    with gzip.open(tmp_path / "b" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third", "id": 3}) + "\n")
    with lzma.open(tmp_path / "b" / "d.txt.xz", "wt") as f:
        f.write("fourth")
    (tmp_path / "b" / "skip.md").write_text("not a corpus file")
    assert list(read_documents([tmp_path])) == ["first\ndoc", "second", "third", "fourth"]
    monkeypatch.setattr(corpus_mod, "BIG_TXT_CHARS", 100)  # a "large" .txt is cut at blank lines
    big = tmp_path / "big.txt"
    paragraphs = [f"paragraph {i} " * 200 for i in range(20)]  # 2,400 characters each
    big.write_text("\n\n\n".join(paragraphs))
    parts = list(read_documents([big]))
    assert len(parts) == 3 and all(len(p) >= corpus_mod.DOC_CHARS for p in parts[:-1])
    assert "\n\n\n".join(parts) == "\n\n\n".join(paragraphs)  # cut only at blank lines, nothing lost


def test_fingerprint_tracks_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    fp = corpus_fingerprint([tmp_path])
    assert fp == corpus_fingerprint([tmp_path]) != corpus_fingerprint(None)
    os.utime(f, ns=(0, 123))
    assert corpus_fingerprint([tmp_path]) != fp


# ---- Parquet and datasets folders (the JSONL reader of the same documents is the reference) -------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows, row_group_size=None):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _save_to_disk(folder, rows, shards, batch_rows=3):
    """The layout datasets' Dataset.save_to_disk writes (datasets 5.2): shards named data-00000-of-0000N.arrow, each
    an Arrow IPC stream of small record batches with the features in the schema's "huggingface" metadata;
    state.json listing the shards in order under _data_files; dataset_info.json with the features."""
    table = pa.Table.from_pylist(rows)
    features = {f.name: {"dtype": "string" if f.type == pa.string() else str(f.type), "_type": "Value"}
                for f in table.schema}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    folder.mkdir(parents=True)
    names, per = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)], math.ceil(len(rows) / shards)
    for i, name in enumerate(names):
        with pa.ipc.new_stream(str(folder / name), table.schema) as writer:
            writer.write_table(table.slice(i * per, per), max_chunksize=batch_rows)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features,
                                                          "homepage": "", "license": ""}, indent=2))
    return folder


def _rows(texts, key="text"):
    return [{"id": i, key: t} for i, t in enumerate(texts)]


def test_parquet_gives_the_token_files_of_the_same_jsonl(tok, docs, tmp_path):
    texts = [d[:2000] for d in docs[:30]]
    jsonl = _jsonl(tmp_path / "c.jsonl", _rows(texts[:10] + ["   "] + texts[10:]))
    # Several row groups, a whitespace row (skipped as in JSONL) and a null row (no document).
    parquet = _parquet(tmp_path / "c.parquet", _rows(texts[:10] + ["   ", None] + texts[10:]), row_group_size=7)
    assert pq.ParquetFile(parquet).num_row_groups == 5
    assert list(read_documents([parquet])) == list(read_documents([jsonl])) == texts
    built = {}
    for f in (jsonl, parquet):
        built[f.suffix] = build_token_files(read_documents([f]), tok, tmp_path / f.suffix[1:], corpus_fingerprint([f]),
                                            val_fraction=0.1, fim_rate=0.5)
    (j_train, j_val), (p_train, p_val) = built[".jsonl"], built[".parquet"]
    assert np.array_equal(j_train.tokens, p_train.tokens) and np.array_equal(j_val.tokens, p_val.tokens)
    assert j_train.n_docs == p_train.n_docs and j_val.n_docs == p_val.n_docs >= 1


def test_datasets_folders_read_as_their_shards_in_order(docs, tmp_path):
    texts = [d[:500] for d in docs[:20]]
    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", _rows(texts[:14]), shards=3)
    _save_to_disk(dd / "test", _rows(texts[14:]), shards=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    (dd / "train" / "cache-0a1b.arrow").write_bytes(b"not listed in state.json, so never read")
    assert list(read_documents([dd])) == list(read_documents([dd / "train"])) == texts[:14]  # the train split
    assert list(read_documents([dd / "test"])) == texts[14:]
    # Inside a plain folder, a datasets folder is its shards, in the sorted walk's place.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _parquet(corpus / "a.parquet", _rows(["first"]))
    _save_to_disk(corpus / "b", _rows(["second", "third"]), shards=2)
    _jsonl(corpus / "c.jsonl", _rows(["fourth"]))
    assert list(read_documents([corpus])) == ["first", "second", "third", "fourth"]
    fp = corpus_fingerprint([corpus])
    os.utime(corpus / "b" / "data-00001-of-00002.arrow", ns=(0, 123))
    assert corpus_fingerprint([corpus]) != fp  # a shard is part of the fingerprint
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "test"]}))
    with pytest.raises(ValueError, match=r"splits \['validation', 'test'\] and no 'train'"):
        read_documents([dd])
    (corpus / "b" / "data-00000-of-00002.arrow").unlink()
    with pytest.raises(FileNotFoundError, match=r"data-00000-of-00002\.arrow"):
        read_documents([corpus])


def test_a_folder_written_by_datasets_itself(tmp_path):
    # The oracle for save_to_disk's layout. datasets is no dependency of dsv3; trl (dev extra) requires it, so it
    # is always there for the tests.
    import datasets
    texts = [f"document {i} " * (i + 1) for i in range(25)]
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": list(range(25)), "body": texts}),
                              "test": datasets.Dataset.from_dict({"id": [0], "body": ["held out"]})})
    d.save_to_disk(str(tmp_path / "dd"), num_shards={"train": 3, "test": 1})
    assert len(list((tmp_path / "dd" / "train").glob("*.arrow"))) == 3
    assert list(read_documents([tmp_path / "dd"], "body")) == texts


def test_parquet_is_streamed_in_record_batches(tmp_path, monkeypatch):
    texts = [f"doc {i}" for i in range(20)]
    f = _parquet(tmp_path / "c.parquet", _rows(texts), row_group_size=4)
    pulled, real = [], pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            pulled.append((batch.num_rows, batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(arrow_mod, "READ_BATCH", 3)
    stream = read_documents([f])
    assert next(stream) == "doc 0" and len(pulled) == 1  # one batch read so far, not the file
    assert [next(stream) for _ in range(5)] == texts[1:6] and len(pulled) == 2
    assert list(stream) == texts[6:]
    assert all(n <= 3 and names == ["text"] for n, names in pulled)  # only the text column, 3 rows at a time


def test_text_column_on_jsonl_parquet_and_datasets_folders(tmp_path):
    texts = ["alpha beta", "gamma delta", "epsilon"]
    jsonl = _jsonl(tmp_path / "c.jsonl", _rows(texts, "body"))
    parquet = _parquet(tmp_path / "c.parquet", _rows(texts, "body"))
    folder = _save_to_disk(tmp_path / "ds", _rows(texts, "body"), shards=2)
    for f in (jsonl, parquet, folder):
        assert list(read_documents([f], "body")) == texts
        assert corpus_fingerprint([f]) == corpus_fingerprint([f], "text") != corpus_fingerprint([f], "body")
    assert list(read_documents(None, "body"))[0] == next(read_documents(None))  # the shipped corpus keeps "text"
    with pytest.raises(ValueError, match=r"c\.jsonl:1: expected an object with a string \"text\" field "
                                         r"\(it has \['body', 'id'\]\)"):
        list(read_documents([jsonl]))
    for given, named in ((parquet, parquet.name), (folder, "data-00000-of-00002.arrow")):
        with pytest.raises(ValueError, match=rf"{named}: no column 'text' \(it has \['id', 'body'\]\)"):
            read_documents([given])  # raised at the call, before any document is read
    with pytest.raises(ValueError, match=r"c\.parquet: column 'id' holds int64, not text"):
        read_documents([parquet], "id")


def test_bad_columnar_files_fail_before_a_tokenizer_is_trained(tmp_path, monkeypatch):
    bpe_runs = []

    def bpe(documents, vocab_size):  # stands in for BPE training: records the corpus it was given, then stops
        bpe_runs.append(list(documents))
        raise ValueError("BPE training reached")

    monkeypatch.setattr(train_loop, "train_bpe", bpe)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _jsonl(corpus / "a.jsonl", _rows(["the king speaks to the queen. " * 20] * 20))  # fine, and read first
    _parquet(corpus / "b.parquet", _rows(["no text column here"], "body"))
    run = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(run), "--vocab-size", "512", "--seq-len", "32",
            "--batch-size", "2", "--steps", "1", "--num-layers", "1", "--device", "cpu", "--threads", "2"]
    with pytest.raises(SystemExit, match=r"b\.parquet: no column 'text' \(it has \['id', 'body'\]\)"):
        main(args)
    assert not (run / "tokenizer").exists() and not bpe_runs
    (corpus / "b.parquet").write_bytes(b"PAR1 but not really a Parquet file")
    with pytest.raises(SystemExit, match=r"b\.parquet: cannot read as Parquet"):
        main(args)
    assert not (run / "tokenizer").exists() and not bpe_runs
    good = _parquet(tmp_path / "good.parquet", _rows(["one document", "another"], "body"))
    args[2], args[4] = str(good), str(tmp_path / "run2")
    with pytest.raises(SystemExit, match="BPE training reached"):  # --text-column reaches the corpus reader
        main([*args, "--text-column", "body"])
    assert bpe_runs == [["one document", "another"]]
    # A shard cut short reads its schema, so it fails while reading, still naming the file.
    shard = _save_to_disk(tmp_path / "ds", _rows([f"doc {i}" for i in range(30)]), shards=1) / \
        "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow: cannot read as an Arrow IPC stream"):
        list(read_documents([tmp_path / "ds"]))


def test_without_pyarrow_only_columnar_data_needs_it(tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` raises ImportError, as if not installed
    fresh = {}
    for name in ("dsv3.data.arrow", "dsv3.data.corpus", "dsv3.rl.sft"):  # their module code runs without it
        spec = importlib.util.find_spec(name)
        fresh[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh[name])
    jsonl = _jsonl(tmp_path / "c.jsonl", _rows(["one", "two"]))
    assert list(fresh["dsv3.data.corpus"].read_documents([jsonl])) == ["one", "two"]
    (tmp_path / "c.parquet").write_bytes(b"never opened")
    with pytest.raises(ImportError, match=r'needs pyarrow: pip install -e "\.\[data\]"'):
        fresh["dsv3.data.corpus"].read_documents([tmp_path / "c.parquet"])
    with pytest.raises(ImportError, match=r"pip install"):
        fresh["dsv3.rl.sft"].read_examples([str(tmp_path / "c.parquet")])


def _chats():
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}
    return [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                      {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]},
        {"messages": [{"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "2"}, {"role": "assistant", "content": "It is 2."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."},
                      {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hi again."}]},
    ]


def test_sft_from_parquet_equals_sft_from_jsonl(tok, tmp_path):
    pairs = [{"prompt": f"Q{i}: what follows {i}?", "completion": f" {i + 1}", "source": "count"} for i in range(4)]
    for name, rows in (("chats", _chats()), ("pairs", pairs)):
        jsonl, parquet = _jsonl(tmp_path / f"{name}.jsonl", rows), _parquet(tmp_path / f"{name}.parquet", rows)
        ours = [tokenize_example(e, tok) for e in read_examples([str(parquet)])]
        reference = [tokenize_example(e, tok) for e in read_examples([str(jsonl)])]
        assert ours == reference and len(ours) == len(rows) and all(any(train) for _, train in ours)
    assert len(read_examples([str(tmp_path / "chats.parquet"), str(tmp_path / "pairs.jsonl")])) == 7
    bad = _parquet(tmp_path / "bad.parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"bad\.parquet: an SFT Parquet file needs a 'messages' column or 'prompt' "
                                         r"and 'completion' columns; it has \['question', 'answer'\]"):
        read_examples([str(bad)])


# ---- BPE -------------------------------------------------------------------------------------------------------


def test_bpe_reserves_special_tokens_and_round_trips(tok, docs):
    assert tok.vocab_size == 512 and tok.bos_id == 0 and tok.eos_id == 1 and tok.pad_id == 1
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
    x = "Hamlet: To be, or not to be\n\t 日本語 ‘x’ \x00 <think>?</think>"
    assert tok.decode(tok.encode(x)) == x
    assert "chat_template" not in tok.config  # the built-in DeepSeek-V3 format renders chats
    # Deterministic training: a retrained tokenizer has the same hash, so cached token files stay valid.
    assert train_bpe(docs[:40], 512).tok.to_str() == tok.tok.to_str()
    with pytest.raises(ValueError, match="vocab_size=300"):
        train_bpe(["text"], 300)


def test_bpe_loads_with_from_dir_and_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, EOS)
    for x in ["Good morrow, my lord.", f"{BOS}fim: {FIM_BEGIN}a{FIM_HOLE}b{FIM_END}", "  two  spaces\n\nend  "]:
        assert ours.encode(x) == hf(x)["input_ids"] == tok.encode(x)


# ---- token files -----------------------------------------------------------------------------------------------


def _split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == 0).tolist()  # BOS = 0
    return [tokens[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(tokens)])]


def test_token_files_delimit_documents_and_split_by_document(tok, docs, tmp_path):
    train, val = build_token_files(docs[:60], tok, tmp_path, "fp", val_fraction=0.1, fim_rate=0.0)
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert train.n_docs + val.n_docs == 60 and val.n_docs >= 1
    seqs = _split_docs(np.asarray(train.tokens)) + _split_docs(np.asarray(val.tokens))
    assert len(seqs) == 60 and all(s[0] == 0 and s[-1] == 1 and 1 not in s[1:-1] for s in seqs)
    assert sorted(tok.decode(s[1:-1]) for s in seqs) == sorted(docs[:60])  # every document exactly once
    meta = json.loads((tmp_path / "tokens.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_docs"] == val.n_docs


def test_token_files_are_reused_and_rebuilt_on_change(tok, docs, tmp_path):
    reads = []

    def counted():
        for d in docs[:20]:
            reads.append(1)
            yield d

    first = build_token_files(counted(), tok, tmp_path, "fp1")
    n, mtime = len(reads), (tmp_path / "train.bin").stat().st_mtime_ns
    again = build_token_files(counted(), tok, tmp_path, "fp1")
    assert len(reads) == n and (tmp_path / "train.bin").stat().st_mtime_ns == mtime  # nothing read or written
    assert np.array_equal(first[0].tokens, again[0].tokens) and again[1].n_docs == first[1].n_docs
    build_token_files(counted(), tok, tmp_path, "fp2")  # another corpus fingerprint
    assert len(reads) == 2 * n
    build_token_files(counted(), tok, tmp_path, "fp2", seed=1)  # another setting
    assert len(reads) == 3 * n
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fim_rewrites_train_documents_psm(tok, docs, tmp_path):
    texts = [d[:3000] for d in docs[:30]]
    fim_begin, hole, end = (tok.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    train, val = build_token_files(texts, tok, tmp_path / "fim", "fp", val_fraction=0.1, fim_rate=1.0)
    seen = []
    for s in _split_docs(np.asarray(train.tokens)):
        assert s[:2] == [0, fim_begin] and s[-1] == 1
        h, e = s.index(hole), s.index(end)
        prefix, suffix, middle = tok.decode(s[2:h]), tok.decode(s[h + 1 : e]), tok.decode(s[e + 1 : -1])
        seen.append(prefix + middle + suffix)
    assert len(seen) == train.n_docs and all(t in texts for t in seen)
    assert fim_begin not in np.asarray(val.tokens)  # validation documents never get FIM
    train0, _ = build_token_files(texts, tok, tmp_path / "plain", "fp", val_fraction=0.1, fim_rate=0.0)
    assert fim_begin not in np.asarray(train0.tokens)


def test_too_few_documents_is_an_error(tok, tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        build_token_files(["only one"], tok, tmp_path, "fp")


def test_unigram_loss_matches_hand_computation():
    train = TokenFile(None, np.array([0, 1, 1, 2], dtype=np.uint16), 1)
    val = TokenFile(None, np.array([1, 3], dtype=np.uint16), 1)
    # add-one: p = (count + 1) / (4 + V) with V = 4 → p(1) = 3/8, p(3) = 1/8 (never seen in train)
    assert unigram_loss(train, val, 4) == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)


# ---- loader ----------------------------------------------------------------------------------------------------


def _stream(n: int = 103) -> TokenFile:
    tokens = np.arange(n, dtype=np.uint16) % 50 + 2  # no BOS except where placed below
    tokens[[0, 5, 17, 40, 41, 90]] = 0
    return TokenFile(None, tokens, 6)


def test_loader_windows_overlap_by_one_and_labels_shift():
    tf = _stream()
    loader = PackedLoader(tf, seq_len=10, batch_size=3, shuffle=False)
    assert len(loader) == 10  # (103 - 1) // 10
    b = loader.next_batch()
    assert b.input_ids.dtype == b.labels.dtype == b.doc_ids.dtype == torch.int64 and b.input_ids.shape == (3, 10)
    assert torch.equal(b.input_ids[:, 1:], b.labels[:, :-1])
    assert torch.equal(b.to("cpu").doc_ids, b.doc_ids)
    assert torch.equal(b.labels[:-1, -1], b.input_ids[1:, 0])  # window w's last label opens window w + 1
    full = torch.from_numpy(tf.tokens.astype(np.int64))
    for row, w in enumerate(range(3)):
        assert torch.equal(b.input_ids[row], full[w * 10 : w * 10 + 10])
        assert torch.equal(b.labels[row], full[w * 10 + 1 : w * 10 + 11])
    # doc_ids: 0 at t=0, +1 at each later BOS (tokens 5 and 17 → window 0 has one, window 1 has one at t=7)
    assert b.doc_ids[0].tolist() == [0] * 5 + [1] * 5
    assert b.doc_ids[1].tolist() == [0] * 7 + [1] * 3
    assert b.doc_ids[2].tolist() == [0] * 10


def test_loader_epochs_are_permutations_and_resume_exactly():
    tf = _stream(1001)
    a = PackedLoader(tf, seq_len=8, batch_size=5, seed=3)
    n = len(a)  # 125 windows: 25 batches an epoch, so 30 batches cross into epoch 1
    firsts = [a.next_batch().input_ids[:, 0] for _ in range(25)]
    assert sorted(torch.cat(firsts).tolist()) == sorted(tf.tokens[np.arange(n) * 8].tolist())
    a = PackedLoader(tf, seq_len=8, batch_size=7, seed=3)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = PackedLoader(tf, seq_len=8, batch_size=7, seed=3)
    b.load_state_dict(state)
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.doc_ids, y.doc_ids)
    for _ in range(20):  # past the epoch boundary too
        assert torch.equal(a.next_batch().labels, b.next_batch().labels)
    assert a.epoch == b.epoch >= 1
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(tf, seq_len=8, batch_size=7, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(tf, seq_len=9, batch_size=7, seed=3).load_state_dict(state)


def test_loader_eval_batches_and_too_short_data():
    tf = _stream()
    loader = PackedLoader(tf, seq_len=10, batch_size=4)
    batches = list(loader.eval_batches(None))
    assert [len(b.input_ids) for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0].input_ids[0], torch.from_numpy(tf.tokens[:10].astype(np.int64)))
    assert len(list(loader.eval_batches(2))) == 2 and loader.position == 0
    with pytest.raises(ValueError, match=r"seq_len=200"):
        PackedLoader(tf, seq_len=200, batch_size=1)
