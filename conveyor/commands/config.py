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


MARKER = "This table is generated from the schema"


def _keys(args) -> int:
    table = cfgmod.markdown_table()
    if args.update:
        from pathlib import Path

        from ..io.atomic import write_text

        text = Path(args.update).read_text()
        head, sep, _ = text.partition(MARKER)
        if not sep:
            from ..errors import InputError

            raise InputError(args.update, f"no line starting with {MARKER!r}", "add it where the table should go")
        line_end = text.index("\n", len(head)) + 1
        write_text(args.update, text[:line_end] + "\n" + table)
        print(f"updated {args.update}")
    else:
        print(table, end="")
    return 0


def register(group) -> None:
    p = group("config").add_parser("check", help="validate a config file against the schema (defaults filled)")
    p.add_argument("configfile")
    p.add_argument("--show", action="store_true", help="print the config with defaults filled in")
    p.set_defaults(func=_check)
    p = group("config").add_parser("keys", help="print a Markdown table of every config key")
    p.add_argument("--update", metavar="README", help="replace the table in this Markdown file (after its marker line)")
    p.set_defaults(func=_keys)
