"""Prompt upsampling: a pluggable enhancer whose output is the prompt the job reports.

The default is deterministic and offline: it adds the composition, lighting and detail cues that
upsampling models typically add, choosing among them by seed so a retry gives the same prompt.
"""

from __future__ import annotations

import random
from typing import Protocol

_CUES = (
    ("highly detailed", "finely detailed", "crisp detail"),
    ("soft natural lighting", "balanced studio lighting", "warm ambient light"),
    ("sharp focus", "clean composition", "well-balanced composition"),
)


class PromptEnhancer(Protocol):
    def enhance(self, prompt: str, seed: int) -> str: ...


class StyleCueEnhancer:
    def enhance(self, prompt: str, seed: int) -> str:
        rng = random.Random(seed)
        cues = ", ".join(rng.choice(options) for options in _CUES)
        return f"{prompt.strip().rstrip('.')}, {cues}"
