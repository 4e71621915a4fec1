"""Importing this imports peft without bitsandbytes (the forkserver preloads it; so does a worker process).

peft imports bitsandbytes eagerly in one place only (`peft.helpers`, which peftbench does not use); every
quantized code path imports it when it needs it. Importing bitsandbytes is slow (8.7 s on the H200 machine,
1 s on the CPU ones) and queries the GPU, so it initialises CUDA, which a forkserver must not do. So peft is
imported with bitsandbytes hidden, which is then un-hidden: a QLoRA run imports it when it quantizes the
model, the other runs never do.
"""

import sys


def _import_peft() -> None:
    if "peft" in sys.modules:
        return
    hide = "bitsandbytes" not in sys.modules
    if hide:
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec says absent
    try:
        import peft  # noqa: F401
    finally:
        if hide and sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]


_import_peft()
