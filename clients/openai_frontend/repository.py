"""What the frontend reads from the generated model repository: the served models and their tokenizers.

Every `platform: "ensemble"` model is served under its own name. Its tokenizer is the one its first step
(the `preprocessing` model) loads: `<repo>/<step model>/<tokenizer_dir>`, where `tokenizer_dir` is that
model's config parameter (tools/generate_repo.py writes `1/tokenizer`, holding the checkpoint's
tokenizer.json, tokenizer_config.json and chat_template.jinja). The context length is the engine model's
`max_model_len` parameter, else its checkpoint's `max_position_embeddings`.

The engine model is the ensemble's decoupled step (backend "tritium"). The frontend sends its requests there
by default, with the prompt tokenized as preprocessing would: tritonserver 2.51 does not pass a gRPC
cancellation on to a running composing model of an ensemble (measured: a cancelled ensemble stream kept its
engine request running to max_tokens, 37 s; the same cancel sent to the engine model freed its KV blocks in
0.3 s), so only this route lets a client disconnect free the engine request.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 2048


@dataclass
class ServedModel:
    name: str  # the ensemble's name: what clients pass as `model`
    tokenizer: object
    context_length: int
    created: int = 0
    engine: str | None = None  # the ensemble's decoupled engine step (input_ids in, text deltas out)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse((model_dir / "config.pbtxt").read_text(), config)
    return config


def find_models(repo: str | Path) -> dict[str, ServedModel]:
    """{name: ServedModel} for every ensemble in the repository; an error names what is missing."""
    repo = Path(repo)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist")
    models = {}
    for model_dir in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
        config = read_config(model_dir)
        if config.platform == "ensemble":
            models[config.name or model_dir.name] = load_model(repo, model_dir, config)
    if not models:
        raise FileNotFoundError(f"{repo}: no ensemble model (generate one with python -m tools.generate_repo)")
    return models


def load_model(repo: Path, model_dir: Path, config) -> ServedModel:
    from transformers import AutoTokenizer

    steps = [s.model_name for s in config.ensemble_scheduling.step]
    tokenizer_dir = find_tokenizer_dir(repo, steps)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    created = int((model_dir / "config.pbtxt").stat().st_mtime)
    return ServedModel(config.name or model_dir.name, tokenizer, context_length(repo, steps), created,
                       find_engine(repo, steps))


def find_engine(repo: Path, steps: list[str]) -> str | None:
    """The step that is a decoupled model taking input_ids: the engine (None if there is none)."""
    for step in steps:
        if not (repo / step / "config.pbtxt").is_file():
            continue
        config = read_config(repo / step)
        if config.model_transaction_policy.decoupled and any(i.name == "input_ids" for i in config.input):
            return config.name or step
    return None


def find_tokenizer_dir(repo: Path, steps: list[str]) -> Path:
    for step in steps:
        step_dir = repo / step
        if not (step_dir / "config.pbtxt").is_file():
            continue
        params = read_config(step_dir).parameters
        if "tokenizer_dir" in params:
            path = step_dir / params["tokenizer_dir"].string_value
            if path.is_dir():
                return path
    raise FileNotFoundError(f"{repo}: no step of the ensemble ({', '.join(steps)}) has a tokenizer_dir parameter "
                            "naming an existing directory")


def context_length(repo: Path, steps: list[str]) -> int:
    """The engine's max_model_len if set, else the checkpoint's positions; DEFAULT_CONTEXT if unknown."""
    for step in steps:
        step_dir = repo / step
        if not (step_dir / "config.pbtxt").is_file():
            continue
        params = read_config(step_dir).parameters
        if "max_model_len" not in params and "model" not in params:
            continue
        limit = _int(params["max_model_len"].string_value) if "max_model_len" in params else 0
        positions = _checkpoint_positions(step_dir / params["model"].string_value) if "model" in params else 0
        values = [v for v in (limit, positions) if v > 0]
        if values:
            return min(values)
    log.warning("context length unknown; assuming %d tokens", DEFAULT_CONTEXT)
    return DEFAULT_CONTEXT


def _checkpoint_positions(checkpoint: Path) -> int:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(config.get("max_position_embeddings") or 0)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
