"""The one error a study raises when it cannot start or go on (a cluster, a tracking server, a folder):
its message is the one line the CLI prints."""

from __future__ import annotations


class StudyError(RuntimeError):
    """The study cannot start or go on (cluster, tracking server, existing folder); one clear line."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the study outside Tune's loop (e.g. while the dense model trains); still a
    KeyboardInterrupt for scripts, its message the CLI's one line with the resume command."""
