"""Triton-language kernels, each beside a plain-torch reference of the same function.

CPU runs use the references; GPU runs use the kernels (see backend/engine/attention.py for dispatch).
"""
