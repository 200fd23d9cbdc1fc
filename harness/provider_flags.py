"""`--provider`: the LoRA provider the runtime under test runs (runtime/providers), and `--kernel`, its old name,
kept working for scripts. Both set `args.kernel`."""

from __future__ import annotations

import argparse


def add_provider_flag(parser: argparse.ArgumentParser, what: str = "the runtime's LoRA provider",
                      default: str | None = None) -> None:
    from runtime.providers import DEFAULT, RUNTIME, describe

    default = default or DEFAULT
    parser.add_argument("--provider", dest="kernel", default=default, choices=RUNTIME,
                        help=f"{what}: {describe(RUNTIME)} (default {default})")
    parser.add_argument("--kernel", dest="kernel", choices=RUNTIME, default=argparse.SUPPRESS,
                        help="the old name of --provider, still accepted")


def check_provider(name: str, dtype, device) -> None:
    """Refuse, before any work, a provider that cannot run at this dtype on this device (one line, exit 2)."""
    from runtime.providers import PROVIDERS

    PROVIDERS[name].check(dtype, device, who="--provider")
