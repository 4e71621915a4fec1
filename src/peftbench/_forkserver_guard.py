"""Imported by the forkserver alone (the last of `runner.PRELOAD`): the forkserver is killed when the CLI
that started it dies, and the workers it forked die with it (each dies with its parent)."""

from .worker import die_with_parent

die_with_parent()
