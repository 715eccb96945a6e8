"""Known-harmless warnings of the model stack's imports, dropped at the loggers that emit them.

Importing diffusers imports torchao when it is installed (the ``quant`` extra), and transformers resolves
the image processors diffusers' pipelines name. On a CPU machine without Triton or torchvision that prints
warnings a new user reads as faults, though nothing we run needs what they mention: torchao's CUDA-only
kernels and Triton, torch.compile's Enum constants, torchao-serialized checkpoints (we quantize at load),
torchvision image processors (the PIL ones are used). Each filter matches one logger and one message, so any
other warning of those libraries still shows.
"""

from __future__ import annotations

import logging

# (logger, a piece of the message): each one a warning seen at worker start-up, and why it is harmless above
HARMLESS: tuple[tuple[str, str], ...] = (
    ("torchao", "torchao/_C"),  # "Failed to load .../torchao/_C_mxfp8...so": CUDA kernels
    ("torchao.kernel.intmm", "Detected no triton"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_model_stack_imports() -> None:
    """Install the filters; call before the first import of diffusers or transformers."""
    for name, fragment in HARMLESS:
        logging.getLogger(name).addFilter(_DropMessage(fragment))
