"""`layermoe env`: the versions a bug report needs, each marked inside or outside the tested range."""

from __future__ import annotations

import json
import sys

from rich.table import Table

from layermoe.core.console import console
from layermoe.core.environment import environment
from layermoe.core.workdir import Workdir
from layermoe.pipeline.options import EnvOptions


def show_env(workdir: Workdir, options: EnvOptions) -> None:
    """Print the environment (a table, or `--json`); reads nothing of the work dir."""
    found = environment()
    if options.as_json:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    accelerator = found["accelerator"]
    if "torch_error" in accelerator:
        device = f"torch does not import: {accelerator['torch_error']}"
    elif accelerator["cuda_available"]:
        device = f"CUDA {accelerator['cuda_build']}: {', '.join(accelerator['gpus'])} (bf16: {accelerator['bf16']})"
    else:
        device = f"CPU only (torch CUDA build: {accelerator['cuda_build'] or 'none'})"
    table = Table(title=f"layermoe {found['layermoe']} · Python {found['python']} · {found['platform']}",
                  caption=device, title_justify="left", caption_justify="left")
    for column in ("package", "version", "tested range", ""):
        table.add_column(column)
    for package in found["packages"]:
        mark = {True: "ok", False: "OUTSIDE the tested range", None: ""}[package["in_range"]]
        table.add_row(package["name"], package["version"] or "not installed", package["tested"] or "—", mark)
    console.print(table, soft_wrap=True)
    if found["outside_tested_range"]:
        console.print(f"untested: {', '.join(found['outside_tested_range'])}: `make setup` installs the locked set "
                      "CI tested, or see README, \"Versions\"", highlight=False, soft_wrap=True)
