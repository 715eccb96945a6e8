"""Moderation on local engines: the request's ``safety_tolerance`` as thresholds of two offline classifiers.

- Text: ``alt-profanity-check`` (MIT; a scikit-learn model inside its wheel) scores the prompt.
- Images: Yahoo's open_nsfw (BSD-2-Clause), converted to ONNX and shipped in ``safety/models``, scores every
  input image and every output image on onnxruntime (see docs/moderation.md and
  scripts/open_nsfw_to_onnx.py).

A score at or above the tolerance's threshold refuses: the prompt or an input before any work
(``Request Moderated``), an output after it (``Content Moderated``); the reason names the check. Both
libraries are imported on first use, in worker processes only: the API process never loads them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from PIL import Image

from fluxserve.errors import Moderated

# safety_tolerance (0 strictest .. 6) -> (prompt threshold, image threshold): a score at or above refuses;
# None checks nothing. FLUX.2's scale stops at 5 and uses the same rows. Measured against the benign sets of
# bench/moderation.py (BENCHMARKS.md): none of them reaches even the tolerance-0 row.
THRESHOLDS: dict[int, tuple[float, float] | None] = {
    0: (0.60, 0.40),
    1: (0.70, 0.55),
    2: (0.80, 0.70),
    3: (0.90, 0.80),
    4: (0.95, 0.88),
    5: (0.98, 0.95),
    6: None,
}
OFF = "off"
MODEL_FILE = "open_nsfw.onnx"
IMAGE_SIDE = 224  # open_nsfw's input: a 224x224 BGR image less the mean of its training set
BGR_MEAN = (104.0, 117.0, 123.0)


def effective_tolerance(requested: int, floor: int) -> int:
    """The tolerance a job is checked (and relayed) at: never more lenient than the operator's floor."""
    return min(requested, floor)


# What the two classifiers import (the ``local`` extra installs them), as import names.
CLASSIFIER_MODULES = ("profanity_check", "onnxruntime", "numpy")


def parse_setting(value: str) -> int | None:
    """``FLUXSERVE_MODERATION``: ``off`` (None) or the operator's floor, 0..6."""
    text = value.strip().lower()
    if text == OFF:
        return None
    if text.isdigit() and int(text) in THRESHOLDS:
        return int(text)
    raise ValueError(f"moderation: must be 'off' or an integer between 0 and 6, not {value!r}")


class Scorer(Protocol):
    """One classifier: a probability of being objectionable per input, 0..1."""

    def __call__(self, items: list[Any]) -> list[float]: ...


class TextScorer:
    """alt-profanity-check's linear model over a bag of words; loaded once, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._predict: Any = None

    def __call__(self, items: list[Any]) -> list[float]:
        with self._lock:
            if self._predict is None:
                from profanity_check import predict_prob  # a scikit-learn model: worker processes only

                self._predict = predict_prob
        return [float(score) for score in self._predict(items)]


class ImageScorer:
    """open_nsfw on onnxruntime, one thread per call (the worker's engine owns the other cores)."""

    def __init__(self, threads: int = 1) -> None:
        self._threads = threads
        self._lock = threading.Lock()
        self._session: Any = None

    def _load(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime  # worker processes only

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self._threads
                options.inter_op_num_threads = 1
                model = resources.files("fluxserve.safety").joinpath("models", MODEL_FILE).read_bytes()
                self._session = onnxruntime.InferenceSession(
                    model, options, providers=["CPUExecutionProvider"]
                )
            return self._session

    def __call__(self, items: list[Any]) -> list[float]:
        import numpy as np

        session = self._load()
        batch = np.stack([_pixels(image) for image in items])
        probabilities = session.run(None, {"data": batch})[0]
        return [float(row[1]) for row in probabilities]


def _pixels(image: Image.Image) -> Any:
    """What open_nsfw was trained on: the whole image at 224x224, BGR, channels first, less the mean."""
    import numpy as np

    resized = image.convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
    bgr = np.asarray(resized, dtype=np.float32)[:, :, ::-1] - np.array(BGR_MEAN, dtype=np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1))


@dataclass
class Moderator:
    """The checks a worker runs; ``floor`` is the operator's (:func:`parse_setting`), never None here."""

    floor: int
    text: Scorer
    images: Scorer

    def tolerance(self, requested: int) -> int:
        return effective_tolerance(requested, self.floor)

    def check_prompt(self, prompt: str, tolerance: int) -> None:
        """Refuse a prompt the text classifier scores at or above the tolerance's threshold."""
        if prompt.strip():
            self._check("request", "prompt", "text", self.text, prompt, tolerance)

    def check_input(self, image: Image.Image, field: str, tolerance: int) -> None:
        """Refuse an input image the image classifier flags; the reason names its field."""
        self._check("request", field, "image", self.images, image, tolerance)

    def check_output(self, image: Image.Image, tolerance: int) -> None:
        self._check("content", "output image", "image", self.images, image, tolerance)

    def _check(self, kind: str, what: str, check: str, scorer: Scorer, item: Any, tolerance: int) -> None:
        level = self.tolerance(tolerance)
        limits = THRESHOLDS[level]
        if limits is None:
            return
        score = scorer([item])[0]
        if score >= limits[0 if check == "text" else 1]:
            raise Moderated(kind, f"{what}: the {check} check scored {score:.2f} (tolerance {level})")


def make_moderator(setting: str) -> Moderator | None:
    """The worker's moderator from ``FLUXSERVE_MODERATION``; None when it is off. The classifiers load on
    first use; a missing one is named here, at start, rather than failing every job."""
    floor = parse_setting(setting)
    if floor is None:
        return None
    from importlib.util import find_spec

    missing = [name for name in CLASSIFIER_MODULES if find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"FLUXSERVE_MODERATION={setting} needs {', '.join(missing)}: pip install 'fluxserve[local]', "
            "or set FLUXSERVE_MODERATION=off"
        )
    return Moderator(floor, TextScorer(), ImageScorer())
