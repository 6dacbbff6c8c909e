"""``tachymail config diff``: the settings that differ from the defaults, like ``postconf -n``."""

from __future__ import annotations

import argparse
import sys

from tachymail.config import ConfigError, changed_toml, load


def add_diff_parser(config_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``diff`` under ``tachymail config``."""
    diff = config_sub.add_parser(
        "diff",
        help="print only the settings that differ from the defaults (like postconf -n)",
        description="Print, as TOML, only the settings of the configuration that differ from "
        "the embedded defaults; the output read back gives the same configuration. Nothing "
        "is printed when everything is at its default.",
    )
    diff.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    diff.set_defaults(handler=cmd_config_diff)


def cmd_config_diff(args: argparse.Namespace) -> int:
    """Exit 0 with the differing settings on stdout; 1 with each problem on stderr."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    sys.stdout.write(changed_toml(config))
    return 0
