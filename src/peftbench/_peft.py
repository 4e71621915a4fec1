"""Importing this imports peft without bitsandbytes (the forkserver preloads it; a run imports it first).

peft imports bitsandbytes eagerly in one place only (`peft.helpers`, which peftbench does not use); every
quantized code path imports it when it needs it. Importing bitsandbytes queries the GPU, so it initialises
CUDA, which a forkserver must not do, and it is slow (8.7 s on the H200 machine, without bytecode; on the
CPU ones 1 s, 0.06 s as `models.quantization_supported` imports it). So peft is
imported with bitsandbytes hidden, which is then un-hidden: a QLoRA run imports it when it quantizes the
model, the other runs never do.
"""

import contextlib
import sys


@contextlib.contextmanager
def without_bitsandbytes(hide: bool = True):
    """peft as if bitsandbytes were not installed, for models that quantize nothing (`hide` False: as is).

    Building a LoRA or IA3 model imports bitsandbytes too: peft's layer dispatch asks `is_bnb_available()` and
    then imports its bitsandbytes layer classes (4 s per run on the H200 machine, where every run is a fresh
    process). peft caches the answer, so the cache is cleared on the way in and out: a QLoRA run later in the
    same process still finds bitsandbytes.
    """
    if not hide:
        yield
        return
    absent = "bitsandbytes" not in sys.modules  # once imported, it stays
    if absent:
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec says absent
    _clear_peft_caches()
    try:
        yield
    finally:
        if absent and sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        _clear_peft_caches()


def _clear_peft_caches() -> None:
    utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        fn = getattr(utils, name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def _import_peft() -> None:
    if "peft" in sys.modules:
        return
    with without_bitsandbytes():
        import peft  # noqa: F401


_import_peft()
