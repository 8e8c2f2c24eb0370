"""The serving layer between Triton and the engine, Triton-free so it is unit-tested without a server:
request parsing (request_parser), tokenization (preprocess), incremental detokenization with stop strings
(detokenizer), one request's response stream (session), engine settings <-> model config (engine_settings),
engine statistics as Triton metrics (metrics)."""
