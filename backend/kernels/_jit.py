"""`lazy_jit`: a @triton.jit that decides at first launch, not at import, whether to compile or interpret.

Why: the kernels live beside their torch references, and every engine module imports those references.
`triton.jit` reads TRITON_INTERPRET when it decorates, so a kernel decorated at import time would be fixed to
"compile" by whichever test imported backend.engine.ops first, before tests/kernels/conftest.py could set
TRITON_INTERPRET=1 on a CPU-only machine. Deferring the decoration also keeps triton optional on CPU.

A kernel may call another lazily jitted function (a helper): when the kernel is first jitted, the helpers its
code names are jitted too and put in their module's namespace in place of their LazyJit, where the compiler (or
the interpreter) looks them up. Helpers are only ever called from kernels, so nothing else sees the swap.
"""
from __future__ import annotations

import functools
from typing import Any, Callable


class LazyJit:
    def __init__(self, fn: Callable, options: dict[str, Any]):
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def kernel(self):
        import triton

        for name in self.fn.__code__.co_names:  # helpers first, so the compiler finds JIT functions there
            helper = self.fn.__globals__.get(name)
            if isinstance(helper, LazyJit):
                self.fn.__globals__[name] = helper.kernel
        return triton.jit(self.fn, **self.options)

    def __getitem__(self, grid):
        return self.kernel[grid]


def lazy_jit(fn: Callable | None = None, **options: Any):
    """Use like @triton.jit, with or without options (e.g. do_not_specialize=[...])."""
    if fn is None:
        return lambda f: LazyJit(f, options)
    return LazyJit(fn, options)

