"""bench/gpu_suite.sh without a GPU: its arguments, its refusals, its report format (a CPU
self-test of the plumbing), and the wheel installation it relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_suite  # noqa: E402


def run_suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bad_arguments_get_one_line_and_exit_code_2():
    done = run_suite("--only", "tests,bogus")
    assert done.returncode == 2
    assert done.stderr == "error: unknown section bogus in --only: use tests, moe, train, decode, compare\n"
    done = run_suite("--frobnicate")
    assert done.returncode == 2
    assert done.stderr == "error: unrecognized arguments: --frobnicate (see bench/gpu_suite.sh --help)\n"
    done = run_suite("--self-test", "--only", "compare")
    assert done.returncode == 2
    assert done.stderr.startswith("error: the compare section trains for minutes on a GPU")


def test_without_cuda_the_suite_says_where_to_run_it():
    done = run_suite("--only", "decode")
    assert done.returncode == 2
    assert done.stderr == ("error: no CUDA device is visible: run the suite on a GPU machine "
                           "(or --self-test for a CPU run of its plumbing)\n")


def test_self_test_writes_the_report_in_benchmarks_format(tmp_path):
    out = tmp_path / "results" / "gpu.md"
    done = run_suite("--self-test", "--only", "tests,decode", "--out", str(out), "--label", "abc1234")
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text == done.stdout
    lines = text.splitlines()
    assert lines[0].startswith("# GPU suite — ") and lines[0].endswith("(CPU self-test)")
    machine = lines[2]
    assert machine.startswith("Machine: no GPU (CPU self-test), ") and "; torch " in machine
    assert "transformers " in machine and "accelerate " in machine and machine.endswith("(abc1234)")
    assert "## `pytest -m cuda` — the CUDA tests" in lines
    assert "1 passed, 0 failed, 0 skipped" in lines
    assert "| test_grouped_and_loop_experts_agree[k-clipped-fp32] | passed |" in text
    assert "## `bench/decode.py` — greedy decoding with the KV cache" in lines
    assert "| shapes | experts (new) | batch | dense base tok/s | expanded tok/s | expanded / base |" in lines
    assert any(line.startswith("| small | 10 (6) | 1 | ") for line in lines)
    assert lines[-1].startswith("Total: ") and lines[-1].endswith("every section passed")


def test_junit_results_become_a_table(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
<testcase classname="t" name="test_a" time="1.25"/>
<testcase classname="t" name="test_b" time="0.5"><failure message="boom"/></testcase>
<testcase classname="t" name="test_c" time="0"><skipped message="no"/></testcase>
</testsuite></testsuites>""")
    assert gpu_suite.junit_table(xml) == "\n".join([
        "1 passed, 1 failed, 1 skipped", "", "| test | outcome | seconds |", "|---|---|---|",
        "| test_a | passed | 1.2 |", "| test_b | failed | 0.5 |", "| test_c | skipped | 0.0 |"])


def test_missing_packages_come_from_the_wheel_folder_or_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_suite.REQUIRED_MODULES, "layermoe_no_such_module", "layermoe-no-such-dist")
    assert gpu_suite.missing_packages() == ["layermoe-no-such-dist"]
    with pytest.raises(gpu_suite.SuiteError, match=r"^missing Python packages layermoe-no-such-dist and no wheels in "):
        gpu_suite.ensure_packages(tmp_path)
    assert gpu_suite.install_command(tmp_path, ["datasets", "eld"])[1:] == [
        "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(tmp_path), "datasets", "eld"]
