"""The one error a study raises when it cannot start or go on (a cluster, a tracking server, a folder):
its message is the one line the CLI prints."""

from __future__ import annotations


class StudyError(RuntimeError):
    """The study cannot start or go on (cluster, tracking server, existing folder); one clear line."""
