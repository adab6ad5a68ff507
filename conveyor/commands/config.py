"""``conveyor config check|keys``: validate an experiment config, list every key."""

from __future__ import annotations

import yaml

from .. import config as cfgmod


def _check(args) -> int:
    cfg = cfgmod.validate_config(cfgmod.load_yaml(args.configfile), source=args.configfile)
    print(f"{args.configfile}: valid")
    if args.show:
        print(yaml.safe_dump(cfg, sort_keys=False))
    return 0


def _keys(args) -> int:
    print(cfgmod.markdown_table(), end="")
    return 0


def register(group) -> None:
    p = group("config").add_parser("check", help="validate a config file against the schema (defaults filled)")
    p.add_argument("configfile")
    p.add_argument("--show", action="store_true", help="print the config with defaults filled in")
    p.set_defaults(func=_check)
    p = group("config").add_parser("keys", help="print a Markdown table of every config key")
    p.set_defaults(func=_keys)
