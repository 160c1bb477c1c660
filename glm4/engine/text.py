"""Token ids → reply text, incrementally: no split multibyte characters, stop strings held back.

`ReplyText.push(token_id)` returns the text that is safe to send now. It strips the `\\n` GLM-4 writes
right after `<|assistant|>` and never returns a stop string or anything after it.
"""

from __future__ import annotations


class IncrementalDecoder:
    """Prefix/read offsets as in TGI: decode a short window and wait while it ends in U+FFFD."""

    # A UTF-8 character has at most 4 bytes and a byte-level token carries at least one, so more unread
    # tokens than this that still end in U+FFFD are invalid bytes, not a character being completed.
    MAX_UNREAD = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        # Special tokens ([gMASK], <sop>, role tokens) are control symbols, never reply text (as in vLLM).
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

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
