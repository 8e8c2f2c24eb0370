"""Incremental detokenization with stop strings: token ids in, safe text deltas out.

Why here and not in postprocessing: stop strings must be matched in text across token boundaries, and the
engine must stop generating there, so the engine model owns the text. Decoding each chunk of tokens on its
own (what TensorRT-LLM's postprocessing does) loses the leading spaces of SentencePiece pieces and splits
multi-byte UTF-8 characters into U+FFFD; instead we decode a short window of previous tokens plus the new
ones and emit only the difference, and hold text back while it ends in an incomplete character.

Guarantee: the deltas returned by `add` and `finish`, concatenated, are the same whatever the chunking of
the token ids, so a streamed answer equals the non-streamed one exactly.
"""
from __future__ import annotations

from typing import Iterable

REPLACEMENT_CHAR = "\ufffd"
# Tokens of context decoded before the new ones: enough for a SentencePiece leading space or a byte-level
# character of up to 4 bytes split over several tokens.
PREFIX_WINDOW = 6


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, cutting at the first stop string.

    `prompt_ids` seed the decode window so that the first output token decodes as it would in context.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, stop_strings: Iterable[str] = (),
                 skip_special_tokens: bool = True):
        self._decode_ids = _decoder(tokenizer, skip_special_tokens)
        self._ids: list[int] = list(prompt_ids or [])[-PREFIX_WINDOW:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.stop = StopStringMatcher(stop_strings)
        self.text = ""  # all decoded output text so far (cut at the stop string once one is found)
        self._emitted = 0  # length of the prefix of self.text already returned

    @property
    def stopped(self) -> bool:
        return self.stop.matched is not None

    def add(self, token_ids: Iterable[int]) -> str:
        """Appends tokens; returns the text that is now final (possibly empty). Nothing after a stop string."""
        if self.stopped:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        self.text += self._decode_new()
        cut = self.stop.find(self.text, self._emitted)
        if cut is not None:
            self.text = self.text[:cut]
            return self._emit(cut)
        return self._emit(len(self.text) - self.stop.held_back(self.text))

    def finish(self) -> str:
        """The rest of the text once no more tokens come (a trailing incomplete character included)."""
        if not self.stopped:
            tail = self._decode_window(self._prefix_offset, len(self._ids))
            head = self._decode_window(self._prefix_offset, self._read_offset)
            self.text += tail[len(head):]
            self._read_offset = len(self._ids)
            cut = self.stop.find(self.text, self._emitted)
            if cut is not None:
                self.text = self.text[:cut]
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def _decode_new(self) -> str:
        """Text of the tokens after read_offset, or '' while it ends in an incomplete character."""
        if len(self._ids) == self._read_offset:
            return ""
        head = self._decode_window(self._prefix_offset, self._read_offset)
        full = self._decode_window(self._prefix_offset, len(self._ids))
        if len(full) <= len(head) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._trim()
        return full[len(head):]

    def _decode_window(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end]) if end > start else ""

    def _trim(self) -> None:
        """Drops ids before the window so memory and decode cost stay constant over long outputs."""
        if self._prefix_offset > 4 * PREFIX_WINDOW:
            drop = self._prefix_offset
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop


class StopStringMatcher:
    """Finds the first stop string in text, and how much of the tail could still begin one."""

    def __init__(self, stop_strings: Iterable[str]):
        self.strings = sorted({s for s in stop_strings if s}, key=len)
        self.max_len = max((len(s) for s in self.strings), default=0)
        self.matched: str | None = None

    def find(self, text: str, start: int) -> int | None:
        """Index of the earliest stop string beginning at or after `start` (text before it was emitted)."""
        best = None
        for s in self.strings:
            index = text.find(s, start)
            if index >= 0 and (best is None or index < best):
                best, self.matched = index, s
        return best

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for length in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.strings):
                return length
        return 0


def _decoder(tokenizer, skip_special_tokens: bool):
    """The fastest decode available: the Rust tokenizer directly, else the transformers method."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", False) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)
