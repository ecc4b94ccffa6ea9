"""Regenerate docs/cli.md from the commands' own argparse definitions (keeps the reference true).

    .venv/bin/python scripts/gen_cli_doc.py
"""
import argparse
import importlib
import os

from flightlog.cli import COMMANDS

HERE = os.path.dirname(os.path.abspath(__file__))
out = ["# CLI reference", "",
       "Generated from the commands' argparse definitions by `scripts/gen_cli_doc.py`; run it after changing a "
       "command. Every command accepts `--store DIR` (default `$FLIGHTLOG_HOME` or `./.flightlog`) and `latest`, a run name or "
       "a unique prefix wherever a run id is expected. Errors print one line `flightlog: error: …` and exit 2.", ""]
out.append("| command | what it does |")
out.append("|---|---|")
for cmd, (mod, help_) in COMMANDS.items():
    out.append(f"| [`flightlog {cmd}`](#flightlog-{cmd}) | {help_} |")
out.append("")
for cmd, (modname, help_) in COMMANDS.items():
    mod = importlib.import_module(modname)
    p = argparse.ArgumentParser(prog=f"flightlog {cmd}", description=help_,
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))
    getattr(mod, f"configure_{cmd.replace('-', '_')}")(p)
    out += [f"## flightlog {cmd}", "", "```", p.format_help().rstrip(), "```", ""]
with open(os.path.join(HERE, "..", "docs", "cli.md"), "w") as fh:
    fh.write("\n".join(out))
print("wrote docs/cli.md")
