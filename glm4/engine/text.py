"""Token ids → reply text, incrementally: no split multibyte characters, stop strings held back.

`ReplyText.push(token_id)` returns the text that is safe to send now. It strips the `\\n` GLM-4 writes
right after `<|assistant|>` and never returns a stop string or anything after it. Special tokens are
control symbols, never reply text (as in vLLM), except `<|assistant|>`: GLM-4 writes it between two tool
calls of one reply, and the chat core splits the calls there (it never shows it as content).
`TokenTexts` gives one token's text and exact bytes, for logprobs.
"""

from __future__ import annotations

import functools

from transformers.convert_slow_tokenizer import bytes_to_unicode

CALL_SEPARATOR = "<|assistant|>"  # kept in the text: it separates parallel tool calls


@functools.lru_cache(maxsize=8)
def hidden_token_ids(tokenizer) -> frozenset[int]:
    """Special tokens that never reach the text: all of them but the tool-call separator."""
    return frozenset(i for i, token in tokenizer.added_tokens_decoder.items()
                     if token.special and token.content != CALL_SEPARATOR)


class IncrementalDecoder:
    """Prefix/read offsets as in TGI: decode a short window and wait while it ends in U+FFFD."""

    # A UTF-8 character has at most 4 bytes and a byte-level token carries at least one, so more unread
    # tokens than this that still end in U+FFFD are invalid bytes, not a character being completed.
    MAX_UNREAD = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.hidden = hidden_token_ids(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.hidden], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        if len(window_text) > len(prefix_text) and not window_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return window_text[len(prefix_text):]
        if len(self.ids) - self.read_offset > self.MAX_UNREAD:
            # Junk bytes (random weights do this): release all but the tokens that may still start a
            # character, so the window stays short instead of growing (and re-decoding) without end.
            cut = len(self.ids) - (self.MAX_UNREAD - 1)
            window_text = self._decode(self.ids[self.prefix_offset:cut])
            self.prefix_offset, self.read_offset = self.read_offset, cut
            return window_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still buffered (a truly invalid byte sequence stays U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window_text[len(prefix_text):]


class StopStringMatcher:
    """Holds back text that might be the start of a stop string; reports a complete one."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe, self.pending = self.pending[:cut], ""
            return safe
        hold = self._longest_partial_stop()
        safe = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(safe):]
        return safe

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:length]):
                    best = length
                    break
        return best

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class ReplyText:
    """Incremental reply text of one request: decoding, leading-newline strip, stop strings."""

    def __init__(self, tokenizer, stops: list[str], strip_leading_newline: bool = True):
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopStringMatcher(stops)
        self.strip_pending = strip_leading_newline
        self.text = ""  # everything returned so far

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def _emit(self, text: str) -> str:
        if self.strip_pending and text:
            self.strip_pending = False
            if text.startswith("\n"):
                text = text[1:]
        if not text:
            return ""
        safe = self.matcher.feed(text)
        self.text += safe
        return safe

    def push(self, token_id: int) -> str:
        return self._emit(self.decoder.push(token_id))

    def finish(self) -> str:
        """Release held-back text at the end of generation (not after a stop string matched)."""
        if self.matcher.stopped:
            return ""
        text = self._emit(self.decoder.flush())
        if self.matcher.stopped:
            return text
        tail = self.matcher.flush()
        self.text += tail
        return text + tail


class TokenTexts:
    """One token's text and its exact UTF-8 bytes (a byte-level BPE token may hold part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        self.byte_values = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else None
        self.special = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
        self._bytes: dict[int, list[int]] = {}

    def bytes(self, token_id: int) -> list[int]:
        if token_id not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if token_id in self.special or self.byte_values is None or piece is None \
                    or any(char not in self.byte_values for char in piece):
                data = self.text(token_id).encode("utf-8")
            else:
                data = bytes(self.byte_values[char] for char in piece)
            self._bytes[token_id] = list(data)
        return self._bytes[token_id]

    def text(self, token_id: int) -> str:
        if token_id in self.special:
            return self.special[token_id]
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
