"""The one exception type users see.

Every error a user can cause (bad input files, wrong shapes, unknown actors, bad configs) raises
:class:`ConsistentAvatarError` or a subclass, with a message that says what to fix. Internal bugs
stay ordinary Python exceptions.
"""

from __future__ import annotations


class ConsistentAvatarError(Exception):
    """A problem the user can fix; the message names what and where."""


class ActorDataError(ConsistentAvatarError):
    """An actor source is malformed. Carries the actor and, where known, the frame index."""

    def __init__(self, actor: str, message: str, frame: int | None = None) -> None:
        self.actor = actor
        self.frame = frame
        where = f"actor {actor!r}" + (f", frame {frame}" if frame is not None else "")
        super().__init__(f"{where}: {message}")
