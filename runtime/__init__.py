"""The runtime under test: Triton multi-LoRA kernels and vision kernels substituted into the HF model.

Without CUDA, Triton kernels can only run in its interpreter; TRITON_INTERPRET must be set before triton
is first imported, so it is set here, at the package's import, unless the user chose otherwise.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
