"""Frame-accurate reads from one actor video with decord, and decoder errors turned into fixes.

Why a wrapper: ingest must be able to ship an actor to Ray workers (so the open decoder, which
cannot be pickled, is dropped on pickling and reopened on first use), must decode only the frames a
chunk needs (decord ``get_batch``: seeks, then decodes), and must report a broken frame by its
index and file instead of an FFmpeg stack trace.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ActorDataError

# decord 0.6 copies FFmpeg frames assuming unpadded rows; at some small widths (16, 24, 48, 72 px)
# FFmpeg pads the rows and decord's copy fails with this check.
_PADDED_ROWS = "DECORDArrayCopyFromTo"
_LOG_PREFIX = re.compile(r"^(\[[0-9:]+\]\s*\S+:\d+:\s*)+")


def decoder_message(exc: BaseException) -> str:
    """The informative part of a decord/FFmpeg error (its first line, without log prefixes)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _LOG_PREFIX.sub("", text).strip()[:240]


class VideoFrames:
    """One video file of an actor, opened lazily with decord (``ctx=cpu``), RGB uint8 frames.

    ``label`` is the file's name inside the actor folder, used in messages.
    """

    def __init__(self, actor: str, path: Path, label: str) -> None:
        self.actor = actor
        self.path = Path(path)
        self.label = label
        self._reader: Any = None
        self._count: int | None = None
        self._size: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # an open decoder does not pickle; reopened where it is used
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _open(self, num_threads: int = 0) -> Any:
        if self._reader is None:
            if not self.path.is_file():
                raise ActorDataError(self.actor, f"{self.label} is missing: expected the file {self.path}")
            from decord import VideoReader, cpu

            try:
                self._reader = VideoReader(str(self.path), ctx=cpu(0), num_threads=num_threads)
            except Exception as exc:  # decord raises RuntimeError / DECORDError for unreadable input
                raise ActorDataError(
                    self.actor,
                    f"{self.label} ({self.path}) cannot be opened by decord/FFmpeg ({decoder_message(exc)}): "
                    f"re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p {self.path.name}`",
                ) from None
        return self._reader

    def close(self) -> None:
        self._reader = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = int(len(self._open()))
        return self._count

    def size(self) -> tuple[int, int]:
        """(height, width) of the decoded frames (decodes frame 0 once)."""
        if self._size is None:
            if len(self) == 0:
                raise ActorDataError(self.actor, f"{self.label} ({self.path}) holds no frames: re-export it")
            first = self.read(np.zeros(1, dtype=np.int64))
            self._size = (int(first.shape[1]), int(first.shape[2]))
        return self._size

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB.

        The decoder is asked for each distinct frame once, in increasing order (cheapest seeking);
        a failing batch is retried frame by frame (:meth:`_decode_each`): the first frame that does not
        decode is named, and a batch that failed only because the decoder read ahead into later damage
        is returned.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            h, w = self.size()
            return np.zeros((0, h, w, 3), np.uint8)
        n = len(self)
        bad = indices[(indices < 0) | (indices >= n)]
        if bad.size:
            raise ActorDataError(
                self.actor,
                f"{self.label} has {n} frames (0..{n - 1}); frame {int(bad[0])} does not exist",
                int(bad[0]),
            )
        uniq, inverse = np.unique(indices, return_inverse=True)
        try:
            frames = self._open().get_batch(uniq.tolist()).asnumpy()
        except ActorDataError:
            raise
        except Exception as exc:
            self.close()  # a decoder that failed mid-stream is not trusted for the next read
            frames = self._decode_each(uniq, exc)
        if frames.ndim != 4 or frames.shape[0] != len(uniq) or frames.shape[3] != 3:
            raise ActorDataError(
                self.actor,
                f"{self.label}: decord returned frames of shape {frames.shape[1:]}, expected (H, W, 3): "
                "re-encode the video as 8-bit RGB/YUV (e.g. libx264, yuv420p)",
                int(uniq[0]),
            )
        return frames[inverse.reshape(-1)]

    def _decode_alone(self, index: int, attempts: int = 3) -> tuple[np.ndarray | None, BaseException | None]:
        """Frame ``index`` (H, W, 3) decoded by a fresh single-threaded reader, or the error of the
        last of ``attempts`` tries when every one fails."""
        error: BaseException | None = None
        for _ in range(attempts):
            try:
                return self._open(num_threads=1).get_batch([index]).asnumpy()[0], None
            except ActorDataError:
                raise
            except Exception as exc:  # decord raises its own DECORDError (and RuntimeError)
                error = exc
            finally:
                self.close()
        return None, error

    def _decode_each(self, uniq: np.ndarray, exc: BaseException) -> np.ndarray:
        """After batch ``uniq`` failed with ``exc``: the frames decoded one at a time, or an error naming
        the first frame that does not decode alone.

        A decoder reads packets ahead (the multi-threaded one on several threads, the single-threaded
        one in its own thread), so damage *after* the batch can fail the batch — and, now and then, a
        single frame before it (seen: frame 0 of a file damaged from frame 5 on, about 1 try in 5).
        So every frame is decoded by a fresh reader, a frame is blamed only when all tries fail, and a
        batch whose frames all decode alone is returned instead of refused.
        """
        if _PADDED_ROWS in str(exc):
            raise ActorDataError(
                self.actor,
                f"{self.label} ({self.path}): decord 0.6 cannot copy frames of this width (FFmpeg pads "
                "their rows; seen at widths such as 16, 24, 48 and 72 px): re-encode the video at "
                "another width, e.g. a multiple of 32",
                int(uniq[0]),
            )
        frames = []
        for i in uniq.tolist():
            frame, error = self._decode_alone(i)
            if frame is None:
                assert error is not None
                raise ActorDataError(
                    self.actor,
                    f"{self.label} ({self.path}): frame {i} cannot be decoded ({decoder_message(error)}): "
                    "the file is damaged; re-export or re-encode it",
                    i,
                )
            frames.append(frame)
        return np.stack(frames)
