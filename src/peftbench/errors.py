"""Errors that end a command with a one-line message and exit status 2 (never a traceback)."""

import contextlib
import os
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def offline_hint() -> str:
    """What a Hub error adds where HF_HUB_OFFLINE is not set: without a network, huggingface_hub retries
    each request five times, 23 s in all (version 2.5), before a Hub id fails."""
    if hub_offline():
        return ""
    return " (without a network, HF_HUB_OFFLINE=1 says so at once, skipping the Hub's retries)"


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it.

    ``problems`` holds one line per problem when validation finds several at once.
    """

    def __init__(self, message: str | list[str]):
        problems = [message] if isinstance(message, str) else list(message)
        # A problem is one line even when it quotes user input that holds line breaks, and it never carries
        # terminal control sequences from that input (an escape could clear the screen or retitle the window).
        self.problems = [
            _CONTROL.sub("?", str(p).replace("\r", "\\r").replace("\n", "\\n")) for p in problems
        ]
        super().__init__("\n".join(self.problems))


class SkipRun(Exception):
    """A run that cannot run on this machine (e.g. QLoRA without bitsandbytes support); recorded as
    `skipped`."""


class Diverged(Exception):
    """A run whose training loss stopped being a finite number; recorded as `diverged`, never as a success,
    with what it measured until then (its epochs' history and seconds)."""

    def __init__(self, message: str, history: list | None = None, metrics: dict | None = None):
        super().__init__(message)
        self.history, self.metrics = list(history or []), dict(metrics or {})


@contextlib.contextmanager
def silent_interrupt():
    """In a worker process: Ctrl-C reaches the whole process group and the CLI says so, once; the worker
    leaves at once, with status 130 and no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        os._exit(130)
