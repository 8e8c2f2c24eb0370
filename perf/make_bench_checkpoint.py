"""A weightless checkpoint of a real shape, for serving benchmarks: config.json plus a synthetic tokenizer.

    python3 perf/make_bench_checkpoint.py --shape llama3-8b --out /tmp/ck8b
    python3 -m tools.generate_repo --model /tmp/ck8b --load-format dummy --output-dir /tmp/repo8b ...

The engine fills random weights at load (load_format "dummy"). The tokenizer is a word-level vocabulary of
the model's size ("t0" ... "tN"), so any token id the random model emits detokenizes: Llama-3's own
tokenizer is not available offline, and throughput does not depend on which strings the ids map to.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.bench_engine import SHAPES, write_config  # noqa: E402


def write_tokenizer(vocab_size: int, folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2",
              "unk_token": "t0", "model_max_length": 8192}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_config(args.shape, args.out)
    write_tokenizer(SHAPES[args.shape]["vocab_size"], args.out)
    print(args.out)


if __name__ == "__main__":
    main()
