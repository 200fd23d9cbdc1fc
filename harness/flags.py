"""Number flags checked by argparse itself, before any work: a NaN or an infinity ('nan', 'inf', '1e999')
parses as a float but is no budget, scale or tolerance, and would surface after the work (or never end)."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """argparse `type=`: a finite float; argparse names the flag in its one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_finite(flag: str, value: float) -> float:
    """The same rule for a number read out of a flag's text (a comma-separated list)."""
    if not math.isfinite(value):
        raise ValueError(f"{flag} {value!r}: not a finite number")
    return value
