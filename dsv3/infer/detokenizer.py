"""Streaming detokenization of one sequence: generated token ids in, safe-to-show text deltas out.

Design notes
- Decoding is not per token. A byte-level BPE token can hold part of a UTF-8 character (an emoji is often two
  tokens), and some decoders (sentencepiece's Metaspace) drop the leading space at the start of a decode. So,
  as vLLM and TGI do, we decode a small window of recent ids and emit only how far its text grew. The window
  starts at a `prefix` a few tokens back, which gives the new tokens their left context; `read` marks where
  the already-shown part of the window ends. Each add() decodes the window (twice when it slides), never the
  whole output: the window shrinks back to the last step's ids whenever the text ends on a whole character,
  or to a cut among the last few ids when steps keep ending mid-character. Only a run of invalid bytes, which
  has no cut, lets it grow (until the text recovers).
- An incomplete character decodes to one trailing U+FFFD (tokenizers' ByteLevel decoder is from_utf8_lossy,
  which maps a truncated but valid sequence to a single replacement). We hold back only that last character;
  everything before it is final, so a long run of invalid bytes from a bad model still streams.
- The window starts with the last prompt ids, so the first completion token decodes exactly as
  decode(prompt + output)[len(decode(prompt)):]. Our tokenizers (DeepSeek's and dsv3.data.bpe's) use the
  ByteLevel decoder, which keeps a leading space ("Ġhello" -> " hello"), so for them this also equals
  decode(output); a Metaspace decoder would drop that space without the context. If the prompt ends in the
  middle of a character, its text has no boundary to cut at, and we decode the output on its own.
- Stop strings are matched on the text after detokenization. While streaming, the longest tail that could still
  grow into a stop string is held back (at most max_len - 1 characters), so no emitted delta ever contains
  part of a stop string. By induction no stop string can then begin in text already emitted, so each search
  only scans the held tail plus the new delta.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsv3.tokenizer import Tokenizer

# How many prompt ids give the first completion token its left context. A few suffice: Metaspace only needs
# one token before, and byte-level BPE needs none (vLLM uses 5 for the same purpose).
PROMPT_CONTEXT_TOKENS = 5
# A step whose text still ends inside a character after this many ids past the last cut looks for a cut among
# its last ids. A valid character is at most 4 bytes, so a clean cut is usually within that reach.
MAX_PENDING_TOKENS = 4
REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete or invalid UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], stop: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        if isinstance(stop, str):  # a bare string would be read as a list of one-character stops
            raise TypeError(f"stop must be a sequence of strings, got the string {stop!r}")
        if "" in stop:
            raise ValueError("stop strings must be non-empty: '' would match before any text")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.text = ""  # every delta returned so far, concatenated
        self.stopped = False
        self.stop_reason: str | None = None
        # Window state: `_window` holds the ids from the prefix on, of which the first `_read` were shown (or are
        # prompt context) when the window last slid; `_shown` counts the characters of the window's text that
        # are context or already passed on to the stop stage (this grows past the `_read` ids' text while
        # an incomplete last character is held back).
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if PROMPT_CONTEXT_TOKENS else []
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT):  # prompt ends mid-character: no clean cut, decode output alone
            context, context_text = [], ""
        self._window = context
        self._read = len(context)
        self._shown = len(context_text)
        self._pending = ""  # detokenized text held back because it could be the start of a stop string

    def add(self, token_ids: list[int]) -> str:
        """Feed newly generated ids; returns the text that is now safe to show ("" if none)."""
        if self.stopped or not token_ids:
            return ""
        return self._emit(self._detokenize(token_ids), final=False)

    def flush(self) -> str:
        """The sequence ended for another reason (EOS, length): release everything held back."""
        if self.stopped:
            return ""
        # The held last character is final now, even if it is a U+FFFD: the full decode has it too.
        tail = self._decode(self._window)[self._shown :]
        self._shown += len(tail)
        return self._emit(tail, final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _detokenize(self, token_ids: list[int]) -> str:
        # The new characters of the window's text, minus a trailing incomplete character.
        self._window.extend(token_ids)
        text = self._decode(self._window)
        end = len(text) - 1 if text.endswith(REPLACEMENT) else len(text)
        delta = text[self._shown : end]
        self._shown = max(self._shown, end)
        if end == len(text):  # whole characters up to the last id
            self._slide(len(self._window), held=0)
        elif len(self._window) - self._read > MAX_PENDING_TOKENS:
            # The steps keep ending inside characters (a ZWJ emoji sequence in byte tokens, fed 1 and 2 ids at a
            # time, can do that for dozens of ids): look for a clean cut among the last few ids so the window
            # stays small.
            for j in range(len(self._window) - 1, max(self._read, len(self._window) - MAX_PENDING_TOKENS), -1):
                if not self._decode(self._window[:j]).endswith(REPLACEMENT):
                    self._slide(j, held=len(text) - self._shown)
                    break
        return delta

    def _slide(self, read: int, held: int) -> None:
        # `read` is a cut after a whole character: the ids up to the old `_read` are no longer needed, those up
        # to `read` become the next decode's left context. Re-decode the new window rather than subtract
        # lengths, since a decoder may change the start of a decode (Metaspace drops a leading space); only the
        # last `held` characters of the window's text are not passed on yet, and they are the same in both.
        self._window = self._window[self._read :]
        self._read = read - self._read
        self._shown = len(self._decode(self._window)) - held

    def _emit(self, delta: str, final: bool) -> str:
        # Stop-string stage: search the held tail + the new text, show all but what could begin a stop string.
        buf = self._pending + delta
        if (match := self._find_stop(buf)) is not None:
            start, stop = match
            out, self._pending = buf[:start], ""
            self.stopped, self.stop_reason = True, stop
        else:
            hold = 0 if final else self._stop_prefix_len(buf)
            out, self._pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        # Earliest start wins (that is where the full text gets cut); on a tie the shorter string, which was
        # complete first, names the reason.
        hits = [(i, len(s), s) for s in self.stop if (i := buf.find(s)) >= 0]
        if not hits:
            return None
        start, _, stop = min(hits)
        return start, stop

    def _stop_prefix_len(self, buf: str) -> int:
        # Length of the longest tail of `buf` that is a proper prefix of some stop string. Holding back exactly
        # that (not always max_len - 1 characters) streams sooner and still never shows part of a match.
        longest = min(len(buf), max((len(s) - 1 for s in self.stop), default=0))
        for k in range(longest, 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
