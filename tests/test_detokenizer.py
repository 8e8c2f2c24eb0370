"""The incremental detokenizer: streamed deltas concatenated equal the whole decode, whatever the chunking;
no U+FFFD from split characters; no lost spaces; stop strings cut across token boundaries."""
from __future__ import annotations

import random

import pytest

from backend.serving.detokenizer import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "The capital of France is Paris. It has  two spaces and\ttabs\nand newlines.",
    "你好，世界！我爱北京天安门。",
    "Party time 🎉🎂🥳 with family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵.",
    "Crème brûlée, café au lait, naïve façade, Ångström, Øresund, São Paulo.",
    "Mixed: déjà vu 😀 中文 and code `x = f(a, b)  # comment`",
    "    leading spaces and trailing spaces    ",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from backend.engine.checkpoint import load_tokenizer

    return load_tokenizer(smollm2_dir)


def chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        out.append(ids[i:i + n])
        i += n
    return out


def run(tokenizer, prompt_ids, pieces, stops=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stops)
    deltas = [detok.add(p) for p in pieces]
    deltas.append(detok.finish())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_equal_whole_decode(tokenizer, text):
    prompt = tokenizer("Say something:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    for seed in range(5):
        deltas, _ = run(tokenizer, prompt, chunks(ids, random.Random(seed)))
        assert "".join(deltas) == expected
        assert all("\ufffd" not in d for d in deltas), deltas  # no split multi-byte character
    one_by_one, _ = run(tokenizer, prompt, [[t] for t in ids])
    assert "".join(one_by_one) == expected


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits the emoji over several tokens
    detok = IncrementalDetokenizer(tokenizer, [], ())
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🎉"


def test_truncated_character_is_flushed_at_finish(tokenizer):
    ids = tokenizer("ab🎉", add_special_tokens=False)["input_ids"][:-1]
    deltas, _ = run(tokenizer, [], [[t] for t in ids])
    assert "".join(deltas) == tokenizer.decode(ids)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    deltas, _ = run(tokenizer, [], [[t] for t in ids])
    assert "".join(deltas) == "Hello there"


@pytest.mark.parametrize("stop", ["Paris", "is Par", "s. It", "两", "门。", "🎂"])
def test_stop_string_across_token_boundaries(tokenizer, stop):
    text = TEXTS[0] if stop in TEXTS[0] else next((t for t in TEXTS if stop in t), TEXTS[0] + " 两")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = text[:text.index(stop)] if stop in text else text
    for seed in range(5):
        deltas, detok = run(tokenizer, [], chunks(ids, random.Random(seed)), [stop, "never-matches-xyz"])
        assert "".join(deltas) == expected
        assert detok.stopped == (stop in text)


def test_text_after_a_stop_string_is_never_emitted(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], ["three"])
    emitted = "".join(detok.add([t]) for t in ids)
    assert detok.stopped and emitted == "one two "
    assert detok.add(tokenizer(" five", add_special_tokens=False)["input_ids"]) == ""
    assert detok.finish() == ""


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["STOP"])
    out = detok.add(tokenizer("go ST", add_special_tokens=False)["input_ids"])
    assert not out.endswith("ST")
    out += detok.add(tokenizer("AY", add_special_tokens=False)["input_ids"])
    assert out + detok.finish() == "go STAY"


def test_stop_matcher_prefers_earliest_match():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.find("hello world", 0) == 3
    assert matcher.matched == "lo w"
    assert matcher.held_back("hello wor") == 3  # "wor" may begin "world"
    assert StopStringMatcher([]).held_back("anything") == 0


class SentencePieceLike:
    """Decodes like SentencePiece: '▁' is a space, and a leading space is dropped at the start of a decode
    (why decoding each token alone loses spaces)."""

    backend_tokenizer = None
    pieces = ["▁Hello", "▁wor", "ld", "!", "▁déjà", "▁vu"]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_no_lost_spaces_with_sentencepiece_style_decoding():
    tok = SentencePieceLike()
    ids = [0, 1, 2, 3, 4, 5]
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive == "Helloworld!déjàvu"  # the TensorRT-LLM postprocessing bug
    deltas, _ = run(tok, [0], [[i] for i in ids])
    assert "".join(deltas) == " Hello world! déjà vu"
