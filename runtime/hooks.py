"""The one place a seeded fault may alter the runtime under test.

Every hook is an identity here, and the runtime calls each of them on its healthy path: a faulted run
differs from a healthy one only in a hook's body, never in which code runs. A fault (harness side)
subclasses `RuntimeHooks`, overrides what it breaks, and is installed with `RuntimeModel.hooks = ...`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlm.arch import TokenCounts


class RuntimeHooks:
    def row_count(self, group: str, image: int, counts: TokenCounts) -> int:
        """Rows the batch's `image`-th image contributes to the tower / connector slot mapping; `counts` are
        the registry's formulas for that image."""
        return counts.rows(group)

    def slot_mapping(self, slots: dict[str, torch.Tensor], requests: Sequence, lengths: Sequence[int]
                     ) -> dict[str, torch.Tensor]:
        """The per-group token -> slot vectors of a batch, after they are laid out."""
        return slots

    def module_group(self, module: str, group: str) -> str:
        """The group whose slot mapping a LoRA module reads."""
        return group

    def module_slots(self, module: str, group: str, slots: torch.Tensor) -> torch.Tensor:
        """The slot vector a LoRA module runs with; the kernel honours whatever comes back."""
        return slots

    def kernel(self, kernel: str, fn: Callable, module: str | None = None) -> Callable:
        """The kernel a call site runs: `lora` for a LoRA module (`module` names it), or a substituted
        vision kernel by its name (`pixel_shuffle`, `position_pool`, `rope_2d`)."""
        return fn


NO_FAULT = RuntimeHooks()
