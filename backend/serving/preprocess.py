"""What the `preprocessing` model does, Triton-free: text to token ids, bad words to token sequences.

Everything derived from the tokenizer is computed once at load: a per-call tokenizer property once cost
TensorRT-LLM backend users 40 ms per request.
"""
from __future__ import annotations

import json

import numpy as np

from backend.engine.errors import InvalidParameterError
from backend.engine.sampling_params import MAX_STOP_SEQUENCES
from backend.serving.batching import parse_rows
from backend.serving.request_parser import MAX_STOP_WORD_BYTES, decode_text, parse_bool_parameter

# Tokenizing is the one cost a request imposes before any limit on tokens can be checked: a prompt of 1 MiB
# takes ~0.3 s in the fast tokenizer here, and no supported context holds that many characters.
MAX_PROMPT_BYTES = 1 << 20
# Each bad word becomes two banned sequences (as written and with a leading space), and the engine takes
# at most MAX_STOP_SEQUENCES of them.
MAX_BAD_WORDS = MAX_STOP_SEQUENCES // 2


class Preprocessor:
    def __init__(self, tokenizer, apply_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.default_chat = apply_chat_template
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if apply_chat_template and not self.has_chat_template:
            raise InvalidParameterError("apply_chat_template", "the tokenizer has no chat template")

    def encode(self, text: str, apply_chat_template: bool | None = None) -> list[int]:
        """Token ids of the prompt; with the chat template, text is one user message or a JSON message list."""
        chat = self.default_chat if apply_chat_template is None else apply_chat_template
        if not chat:
            return list(self.tokenizer(text)["input_ids"])
        if not self.has_chat_template:
            raise InvalidParameterError("apply_chat_template", "the tokenizer has no chat template")
        prompt = self.tokenizer.apply_chat_template(_messages(text), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def word_list(self, words: list[str]) -> np.ndarray:
        """TensorRT-LLM word-list format [1, 2, L]: concatenated ids and end offsets (padded with -1).

        Each word is banned as written and with a leading space, since a word inside a sentence is usually
        tokenized with its space."""
        check_bad_words(words)
        sequences: list[list[int]] = []
        for word in (w for w in words if w):
            for variant in dict.fromkeys([word, " " + word.lstrip(" ")]):
                ids = list(self.tokenizer(variant, add_special_tokens=False)["input_ids"])
                if ids and ids not in sequences:
                    sequences.append(ids)
        flat = [t for s in sequences for t in s] or [0]
        ends = np.cumsum([len(s) for s in sequences]).tolist() if sequences else []
        ends += [-1] * (len(flat) - len(ends))
        return np.array([[flat, ends]], dtype=np.int32)


def preprocess_rows(pre: Preprocessor, text_input, bad_words=None, apply_chat_template: bool | None = None) -> dict:
    """preprocessing's outputs for a request of B prompt rows (batching.py): input_ids [B, longest] with each row
    padded by 0 after its input_lengths [B, 1], and bad_words_ids [B, 2, L] (each row's word list, padded)."""
    prompts = prompt_texts(text_input)
    words = word_rows(bad_words, len(prompts))
    ids = [pre.encode(prompt, apply_chat_template) for prompt in prompts]
    lists = [pre.word_list(row)[0] for row in words]
    return {
        "input_ids": _pad_right([np.array(row, dtype=np.int32)[None] for row in ids], fill=(0,)),
        "input_lengths": np.array([[len(row)] for row in ids], dtype=np.int32),
        # word lists [2, L_i]: ids padded with 0, end offsets with -1 (the format's 'no more')
        "bad_words_ids": _pad_right(lists, fill=(0, -1)),
    }


def _pad_right(rows: list[np.ndarray], fill: tuple[int, ...]) -> np.ndarray:
    """Rows [len(fill), L_i] stacked into [B, len(fill), max L], line j padded with fill[j]; one line: [B, max L]."""
    width = max(r.shape[-1] for r in rows)
    out = np.empty((len(rows), len(fill), width), dtype=np.int32)
    out[:] = np.array(fill, dtype=np.int32)[:, None]
    for i, row in enumerate(rows):
        out[i, :, :row.shape[-1]] = row
    return out[:, 0] if len(fill) == 1 else out


def prompt_texts(tensor) -> list[str]:
    """The prompts of a text_input tensor, one per batch row ([B, 1]); each checked as prompt_text does."""
    text = np.asarray(tensor)
    rows = text.reshape(text.shape[0] if text.ndim else 1, -1)
    if rows.shape[0] == 1:
        return [prompt_text(text)]
    if rows.shape[1] != 1:
        raise InvalidParameterError("text_input", f"one prompt per batch row, got shape {list(text.shape)}")
    return parse_rows(list(rows), prompt_text)


def word_rows(tensor, num_rows: int) -> list[list[str]]:
    """bad_words per prompt row: [B, N] strings ("" for none); absent means no words for any row."""
    if tensor is None:
        return [[] for _ in range(num_rows)]
    words = np.asarray(tensor)
    if num_rows == 1:
        return [word_texts(words, "bad_words")]
    if words.ndim < 1 or words.shape[0] != num_rows:
        raise InvalidParameterError("bad_words", f"expected one row per prompt ({num_rows}), got shape {list(words.shape)}")
    return [word_texts(row, "bad_words") for row in words]


def tokenize_inputs(inputs: dict, parameters: dict, pre: Preprocessor) -> dict:
    """For a request sent to the engine model directly (no ensemble): text_input -> input_ids and
    bad_words -> bad_words_ids, as preprocessing would have done. Inputs already tokenized pass unchanged."""
    out = dict(inputs)
    if "input_ids" not in out:
        if "text_input" not in out:
            raise InvalidParameterError("text_input", "is required (or input_ids)")
        prompt = prompt_text(out["text_input"])
        out["input_ids"] = np.array([pre.encode(prompt, parse_bool_parameter(parameters, "apply_chat_template"))],
                                    dtype=np.int32)
    if "bad_words_ids" not in out and "bad_words" in out:
        out["bad_words_ids"] = pre.word_list(word_texts(out["bad_words"], "bad_words"))
    return out


def prompt_text(tensor) -> str:
    """The one prompt of a text_input tensor: valid UTF-8, not empty, at most MAX_PROMPT_BYTES."""
    text = np.asarray(tensor)
    if text.size != 1:
        raise InvalidParameterError("text_input", f"one prompt per request (batch size 1), got shape {list(text.shape)}")
    value = text.reshape(-1)[0]
    size = len(value) if isinstance(value, (bytes, str)) else 0
    if size > MAX_PROMPT_BYTES:
        raise InvalidParameterError("text_input", f"at most {MAX_PROMPT_BYTES} bytes, got {size}")
    prompt = decode_text(value, "text_input")
    if not prompt:
        raise InvalidParameterError("text_input", "must not be empty")
    return prompt


def word_texts(tensor, name: str) -> list[str]:
    """The strings of a list-of-words tensor (bad_words), as text."""
    return [decode_text(w, name) for w in np.asarray(tensor).reshape(-1)]


def check_bad_words(words: list[str]) -> None:
    words = [w for w in words if w]
    if len(words) > MAX_BAD_WORDS:
        raise InvalidParameterError("bad_words", f"at most {MAX_BAD_WORDS} words, got {len(words)}")
    longest = max((len(w.encode("utf-8")) for w in words), default=0)
    if longest > MAX_STOP_WORD_BYTES:
        raise InvalidParameterError("bad_words", f"each word at most {MAX_STOP_WORD_BYTES} bytes, got {longest}")


def _messages(text: str) -> list[dict]:
    """A JSON list of {"role", "content"} objects is a conversation; anything else is one user message."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            messages = json.loads(stripped)
        except ValueError:
            messages = None
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            return messages
    return [{"role": "user", "content": text}]
