"""Model sources for the reference: the loading code is shared with the runtime (harness/checkpoint.py),
so both sides read the very same weights through the same checks."""

from harness.checkpoint import (  # noqa: F401 - re-exported
    DTYPES,
    build_tiny,
    check_device,
    load_checkpoint,
    parse_dtype,
    read_checkpoint_config,
    save_checkpoint,
)
