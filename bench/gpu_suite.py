"""One command that proves the CUDA path: the CUDA tests and the GPU benchmarks, as Markdown.

    bench/gpu_suite.sh [--out FILE] [--budget-min 8] [--wheels DIR] [--only SECTIONS] [--label TEXT]
    bench/gpu_suite.sh --self-test       # the same plumbing on a CPU, tiny shapes (CI runs it)

Runs, in this order, each in its own process with a time limit, on one GPU and with no network:
  tests    pytest -m cuda (tests/test_cuda.py)
  moe      bench/moe_layer.py --device cuda           (one MoE layer vs Mixtral's, fwd+bwd)
  train    bench/train_throughput.py --device cuda    (stage-1 tokens/s, memory, MFU)
  decode   bench/decode.py --device cuda              (greedy KV-cache decoding vs the dense base)
  compare  recipes/compare-gpu.yaml on the demo model (last; only when asked: --only ...,compare;
           it needs the demo GGUF sent in two halves, see bench/README.md)
and prints every table in BENCHMARKS.md's format, headed by the machine, the versions and
whether they are inside the tested ranges (pyproject.toml), to stdout and to `--out`.
The whole call keeps to `--budget-min` minutes of wall clock (default 8): a section gets at
most the time left, one that cannot start in time is listed as not run, and each table is
appended to `--out` the moment it is done, so a call cut short still returns what finished.
Python packages the GPU machine lacks are installed first from a folder of wheels
(`--wheels`, default `.whl`; bench/README.md says how to fill it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Modules layermoe imports beyond what a CUDA image ships (torch, transformers, accelerate).
REQUIRED_MODULES = {
    "datasets": "datasets",
    "pydantic": "pydantic",
    "langcodes": "langcodes",
    "eld": "eld",
    "gguf": "gguf",
    "typer": "typer",
    "rich": "rich",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
    "pytest": "pytest",
}
SECTIONS = ("tests", "moe", "train", "decode", "compare")  # the order they run in, whatever --only says
DEFAULT_SECTIONS = ("tests", "moe", "train", "decode")
DEFAULT_BUDGET_MIN = 8.0
# A section that would get less than this many seconds of the budget is not started.
MIN_SECONDS = {"tests": 60, "moe": 30, "train": 45, "decode": 30, "compare": 180}
RESERVE_S = 10  # kept back from the budget for the closing lines


@dataclass
class Section:
    name: str
    title: str
    command: list[str]
    timeout_s: int
    env: dict = field(default_factory=dict)
    min_s: float = 1  # not started with less of the budget left than this


class SuiteError(Exception):
    """A problem the person running the suite can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise SuiteError(f"{message} (see bench/gpu_suite.sh --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(prog="bench/gpu_suite.sh", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the report to this Markdown file, each section appended as soon as it is done")
    ap.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                    help=f"wall-clock minutes for the whole call (default {DEFAULT_BUDGET_MIN:g}); sections that "
                         "do not fit are listed as not run")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="folder of wheels for missing packages (default .whl)")
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated sections, run in this order: {', '.join(SECTIONS)} (default: all but compare)")
    ap.add_argument("--workdir", type=Path, default=REPO / "gpu-suite-run", help="where the compare section's runs go")
    ap.add_argument("--label", default=None, help="what was measured, e.g. a commit id (default: git HEAD if known)")
    ap.add_argument("--self-test", action="store_true", help="run the plumbing on a CPU with tiny shapes (for CI)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise SuiteError(f"unknown section {', '.join(unknown) or '(none)'} in --only: use {', '.join(SECTIONS)}")
    if args.self_test and "compare" in sections:
        raise SuiteError("the compare section trains for minutes on a GPU and has no CPU self-test: drop it from --only")
    if not args.budget_min > 0:
        raise SuiteError(f"--budget-min must be a positive number of minutes, not {args.budget_min:g}")
    args.sections = [s for s in SECTIONS if s in sections]  # tests first, compare last
    return args


# ---------------------------------------------------------------------------------------- setup


def missing_packages() -> list[str]:
    """Distribution names of the required modules that do not import here."""
    return sorted({dist for module, dist in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None})


def install_command(wheels: Path, packages: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels), *packages]


def ensure_packages(wheels: Path) -> list[str]:
    """Install what is missing from the wheel folder; return what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        raise SuiteError(f"missing Python packages {', '.join(missing)} and no wheels in {wheels}: "
                         "fill it with the `pip download` command in bench/README.md and send it along")
    done = subprocess.run(install_command(wheels, missing), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SuiteError(f"could not install {', '.join(missing)} from {wheels}: {last}")
    return missing


def sections_for(args: argparse.Namespace, device: str) -> list[Section]:
    py = sys.executable
    if args.self_test:  # tiny shapes on the CPU: seconds, not minutes
        specs = {
            "tests": (["-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-k", "grouped_and_loop and fp32 and k-clipped"],
                      {"LAYERMOE_CUDA_TESTS_ON_CPU": "1"}),
            "moe": (["bench/moe_layer.py", "--device", "cpu", "--small", "--experts", "2", "--tokens", "64",
                     "--iters", "1", "--warmup", "0"], {}),
            "train": (["bench/train_throughput.py", "--device", "cpu", "--small", "--layers", "2", "--steps", "1",
                       "--warmup", "0"], {}),
            "decode": (["bench/decode.py", "--device", "cpu", "--small", "--batches", "1", "--new-tokens", "4",
                        "--repeats", "1"], {}),
        }
    else:
        specs = {
            "tests": (["-m", "pytest", "-m", "cuda", "tests/test_cuda.py"], {}),
            "moe": (["bench/moe_layer.py", "--device", device], {}),
            "train": (["bench/train_throughput.py", "--device", device], {}),
            "decode": (["bench/decode.py", "--device", device], {}),
        }
    compare = (f"bench/join_demo_model.sh >&2 && {py} -m layermoe -w {args.workdir} run recipes/compare-gpu.yaml >&2 "
               f"&& cat {args.workdir}/compare.md")
    specs["compare"] = (["-c", compare], {"PYTHONPATH": os.pathsep.join([str(REPO / ".gpu-demo" / "site"), str(REPO)])})
    titles = {
        "tests": "`pytest -m cuda` — the CUDA tests",
        "moe": "`bench/moe_layer.py` — one MoE layer, forward + backward",
        "train": "`bench/train_throughput.py` — stage-1 training throughput",
        "decode": "`bench/decode.py` — greedy decoding with the KV cache",
        "compare": "`recipes/compare-gpu.yaml` — LayerMoE vs MoE-LPR vs dense fine-tune on the demo model",
    }
    timeouts = {"tests": 420, "moe": 240, "train": 360, "decode": 240, "compare": 600}
    out = []
    for name in args.sections:
        argv, env = specs[name]
        command = ["bash", *argv] if name == "compare" else [py, *argv]
        if name == "tests":
            command += ["-q", "-p", "no:cacheprovider", "-o", "addopts="]
        out.append(Section(name, titles[name], command, timeouts[name], env, 1 if args.self_test else MIN_SECONDS[name]))
    return out


# ---------------------------------------------------------------------------------------- machine


def _run_text(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_line(label: str | None) -> str:
    import torch

    parts = []
    gpu = _run_text(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if gpu:
        name, memory, driver = (x.strip() for x in gpu.splitlines()[0].split(","))
        parts.append(f"{name} ({memory}, driver {driver})")
    elif torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    else:
        parts.append("no GPU (CPU self-test)")
    parts.append(f"{os.cpu_count()} CPU cores")
    versions = [f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")]
    for module in ("transformers", "accelerate"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} missing")
    versions.append(f"Python {platform.python_version()}")
    sys.path.insert(0, str(REPO))
    from layermoe import __version__

    label = label or _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unlabelled tree"
    return f"Machine: {', '.join(parts)}; {', '.join(versions)}; layermoe {__version__} ({label})"


# ---------------------------------------------------------------------------------------- running


def run_section(section: Section, env: dict, timeout_s: float | None = None) -> tuple[str, bool, float]:
    """(Markdown body, passed, seconds). A section that fails or times out still reports what it printed.

    `timeout_s` (default: the section's own limit) is what is left of the budget when that is less;
    on time-out the section's whole process group is stopped (a `bash -c` leaves no child behind).
    """
    limit = section.timeout_s if timeout_s is None else min(section.timeout_s, timeout_s)
    start = time.perf_counter()
    junit = None
    command = list(section.command)
    if section.name == "tests":
        junit = Path(tempfile.mkdtemp()) / "junit.xml"
        command += [f"--junitxml={junit}"]
    process = subprocess.Popen(command, cwd=REPO, env={**env, **section.env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        output, errors = process.communicate(timeout=limit)
        code, error_tail = process.returncode, errors.strip().splitlines()[-5:]
    except subprocess.TimeoutExpired:
        _stop_group(process)
        output, _ = process.communicate()
        cut = "the budget" if limit < section.timeout_s else "its limit"
        code, error_tail = None, [f"timed out after {limit:.0f} s ({cut})"]
    seconds = time.perf_counter() - start
    if junit is not None and junit.is_file():
        body = junit_table(junit)
    else:
        body = (output or "").strip()
    if junit is not None:
        shutil.rmtree(junit.parent, ignore_errors=True)
    passed = code == 0
    if not passed:
        body += "\n\n**failed** (" + ("exit code %s" % code if code is not None else "timeout") + "): " + " / ".join(error_tail)
    return body, passed, seconds


def _stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def junit_table(path: Path) -> str:
    """pytest's JUnit XML as a Markdown table: one row per test, and a count line."""
    root = ET.parse(path).getroot()
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
        rows.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} |")
    head = ", ".join(f"{n} {k}" for k, n in counts.items())
    return "\n".join([head, "", "| test | outcome | seconds |", "|---|---|---|", *rows])


def range_line() -> str:
    """Whether this machine's torch, transformers and accelerate are inside the tested ranges."""
    sys.path.insert(0, str(REPO))
    from layermoe.core.environment import declared_ranges, package_line

    ranges, parts, outside = declared_ranges(), [], []
    for name in ("torch", "transformers", "accelerate", "datasets"):
        line = package_line(name, ranges)
        if line.version is None:
            parts.append(f"{name} missing")
            continue
        mark = {True: "inside", False: "OUTSIDE", None: "no range"}[line.in_range]
        parts.append(f"{name} {line.version} {mark} {line.tested or ''}".rstrip())
        if line.in_range is False:
            outside.append(name)
    verdict = (f"UNTESTED here: {', '.join(outside)} (results may differ from CI's)" if outside
               else "all inside")
    return f"Tested ranges (pyproject.toml): {'; '.join(parts)}: {verdict}"


class Report:
    """stdout and `--out` at once: the file is started empty, every piece appended and flushed as it comes."""

    def __init__(self, out: Path | None):
        self.out, self.parts = out, []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("", encoding="utf-8")

    def add(self, text: str) -> None:
        self.parts.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.out is not None:
            with self.out.open("a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def text(self) -> str:
        return "".join(self.parts)


def report(args: argparse.Namespace, out: Report | None = None) -> tuple[str, bool]:
    started = time.perf_counter()
    deadline = started + args.budget_min * 60
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.self_test:
        raise SuiteError("no CUDA device is visible: run the suite on a GPU machine (or --self-test for a CPU run of its plumbing)")
    installed = ensure_packages(args.wheels)
    out = out or Report(getattr(args, "out", None))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# GPU suite — {stamp}" + (" (CPU self-test)" if args.self_test else ""), "", machine_line(args.label),
            "", range_line(), "", f"Budget: {args.budget_min:g} min for {', '.join(args.sections)}."]
    if installed:
        head.append(f"Installed from {args.wheels}: {', '.join(installed)}.")
    out.add("\n".join(head) + "\n")
    failed, not_run = [], []
    for section in sections_for(args, device):
        left = deadline - RESERVE_S - time.perf_counter()
        if left < section.min_s:
            not_run.append(section.name)
            out.add(f"\n## {section.title}\n\n**not run**: {max(left, 0):.0f} s of the {args.budget_min:g}-minute "
                    f"budget left (run it alone: --only {section.name})\n")
            continue
        print(f"[gpu_suite] {section.name} ({left:.0f} s of the budget left) ...", file=sys.stderr, flush=True)
        body, passed, seconds = run_section(section, env, timeout_s=left)
        if not passed:
            failed.append(section.name)
        shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(section.command))
        out.add("\n".join(["", f"## {section.title}", "", f"`{shown}` — {seconds:.0f} s", "", body]) + "\n")
    total = time.perf_counter() - started
    verdict = "; ".join(([f"SOME SECTIONS FAILED: {', '.join(failed)}"] if failed else [])
                        + ([f"not run (budget): {', '.join(not_run)}"] if not_run else [])) or "every section passed"
    out.add(f"\nTotal: {int(total // 60)} min {int(total % 60)} s of {args.budget_min:g} min; {verdict}\n")
    all_passed = not failed and not not_run
    return out.text(), all_passed


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        _, passed = report(args)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
