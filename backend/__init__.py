"""Tritium: the Triton Inference Server backend and its LLM engine."""
