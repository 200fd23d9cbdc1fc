"""The LoRA provider registry (runtime/providers) is the one list of providers: the runtime, `--provider` (and
`--kernel`, its old name), the bench's schema, cases and report colours all read it."""

from __future__ import annotations

import argparse

import pytest

from harness.cli import build_parser, main
from runtime.providers import DEFAULT, PROVIDERS, RUNTIME, TWIN_PROVIDER, runtime_provider


def _flags(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s: a for a in sub.choices[command]._actions for s in a.option_strings}


def test_every_list_of_providers_is_the_registry():
    from harness.bench import report, schema
    from harness.bench.catalog import all_cases

    assert schema.PROVIDERS == tuple(PROVIDERS)
    assert all(set(c.providers) <= set(PROVIDERS) for c in all_cases().values())
    assert set(report.COLORS) == set(PROVIDERS) and len(set(report.COLORS.values())) == len(PROVIDERS)
    for command in ("correctness", "compare", "faults"):
        assert tuple(_flags(command)["--provider"].choices) == RUNTIME, command
    assert all(name in _flags("bench")["--providers"].help for name in PROVIDERS)


@pytest.mark.parametrize("command", ["correctness", "compare", "faults"])
def test_kernel_is_the_old_name_of_provider(command):
    flags = _flags(command)
    assert flags["--provider"].dest == flags["--kernel"].dest == "kernel"
    # compare leaves it unset, so that `compare REF GOT` (no runtime) can refuse one given explicitly; compare
    # REF then runs the default provider
    default = None if command == "compare" else DEFAULT
    assert flags["--provider"].default == default
    assert "old name" in flags["--kernel"].help
    head = ["compare", "bundle"] if command == "compare" else [command]
    for flag in ("--provider", "--kernel"):
        assert build_parser().parse_args([*head, flag, TWIN_PROVIDER]).kernel == TWIN_PROVIDER
    assert build_parser().parse_args(head).kernel == default


def test_a_bench_baseline_is_refused_by_the_runtime_in_one_line(capsys):
    baselines = [name for name, p in PROVIDERS.items() if not p.runtime]
    assert baselines and DEFAULT in RUNTIME
    for name in baselines:
        with pytest.raises(ValueError, match="bench baseline") as e:
            runtime_provider(name)
        assert "\n" not in str(e.value)
    assert main(["correctness", "--provider", baselines[0]]) == 2
    assert "invalid choice" in capsys.readouterr().err
