"""bench/gpu_suite.sh without a GPU: its arguments, its refusals, its report format (a CPU
self-test of the plumbing), and the wheel installation it relies on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    assert lines[4].startswith("Tested ranges (pyproject.toml): torch ") and " inside >=" in lines[4]
    assert lines[6] == "Budget: 8 min for tests, decode."
    assert "## `pytest -m cuda` — the CUDA tests" in lines
    assert "1 passed, 0 failed, 0 skipped" in lines
    assert "| test_grouped_and_loop_experts_agree[k-clipped-fp32] | passed |" in text
    assert "## `bench/decode.py` — greedy decoding with the KV cache" in lines
    assert "| shapes | experts (new) | batch | dense base tok/s | expanded tok/s | expanded / base |" in lines
    assert any(line.startswith("| small | 10 (6) | 1 | ") for line in lines)
    assert lines[-1].startswith("Total: ") and lines[-1].endswith(" of 8 min; every section passed")


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


def test_sections_run_tests_first_and_compare_last_whatever_only_says():
    assert gpu_suite.parse_args(["--only", "compare,decode,tests"]).sections == ["tests", "decode", "compare"]
    assert gpu_suite.parse_args([]).sections == ["tests", "moe", "train", "decode"]
    assert gpu_suite.parse_args([]).budget_min == 8
    with pytest.raises(gpu_suite.SuiteError, match=r"^--budget-min must be a positive number of minutes, not 0$"):
        gpu_suite.parse_args(["--budget-min", "0"])


def _fake(name: str, code: str) -> gpu_suite.Section:
    return gpu_suite.Section(name, f"section {name}", [sys.executable, "-c", code], timeout_s=300)


def test_the_budget_cuts_the_running_section_and_skips_the_rest(monkeypatch, tmp_path, capsys):
    """0.1 min: `a` finishes, `b` (a minute long) is stopped at the budget with what it printed, `c`
    never starts; --out holds all three, and the exit status says not everything ran."""
    sections = [_fake("a", "print('| a | done |')"),
                _fake("b", "import time; print('b started', flush=True); time.sleep(60)"),
                _fake("c", "print('c ran')")]
    monkeypatch.setattr(gpu_suite, "sections_for", lambda args, device: sections)
    monkeypatch.setattr(gpu_suite, "RESERVE_S", 0)
    out = tmp_path / "gpu.md"
    started = time.perf_counter()
    code = gpu_suite.main(["--self-test", "--budget-min", "0.1", "--only", "tests,moe,decode", "--out", str(out)])
    assert time.perf_counter() - started < 30
    assert code == 1
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "Budget: 0.1 min for tests, moe, decode." in text
    a, b, c = (text.index(f"## section {n}") for n in "abc")
    assert a < b < c and "| a | done |" in text[a:b]
    assert "b started" in text[b:c] and "timed out after " in text[b:c] and "(the budget)" in text[b:c]
    assert "**not run**: 0 s of the 0.1-minute budget left (run it alone: --only c)" in text[c:]
    assert "c ran" not in text
    assert text.splitlines()[-1].endswith("of 0.1 min; SOME SECTIONS FAILED: b; not run (budget): c")


def test_a_call_cut_short_still_leaves_the_finished_tables(tmp_path):
    """The device call ends when its time is up: whatever finished is already in --out."""
    out, pid_file = tmp_path / "gpu.md", tmp_path / "b.pid"
    driver = f"""
import os, sys
sys.path.insert(0, {str(REPO / "bench")!r})
import gpu_suite
S = gpu_suite.Section
gpu_suite.sections_for = lambda args, device: [
    S("a", "section a", [sys.executable, "-c", "print('| a | done |')"], 300),
    S("b", "section b", [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"], 300)]
sys.exit(gpu_suite.main(["--self-test", "--out", {str(out)!r}]))
"""
    suite = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline and suite.poll() is None:
            time.sleep(0.2)
        assert pid_file.exists(), "section b never started"
        suite.send_signal(signal.SIGKILL)  # as a device call cut at its limit
        suite.wait(timeout=30)
    finally:
        suite.kill()
        if pid_file.exists() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = out.read_text()
    assert text.startswith("# GPU suite — ") and "| a | done |" in text
    assert "## section b" not in text and "Total:" not in text


def test_the_range_line_names_a_version_outside_the_tested_range(monkeypatch):
    from layermoe.core import environment

    versions = {"torch": "2.11.0+cu130", "transformers": "5.16.0", "accelerate": "1.16.0"}
    monkeypatch.setattr(environment, "installed_version", lambda name: versions.get(name))
    line = gpu_suite.range_line()
    ranges = environment.declared_ranges()
    assert line.startswith(f"Tested ranges (pyproject.toml): torch 2.11.0+cu130 inside {ranges['torch']}; "
                           f"transformers 5.16.0 OUTSIDE {ranges['transformers']}; accelerate 1.16.0 inside ")
    assert "datasets missing" in line and line.endswith(": UNTESTED here: transformers (results may differ from CI's)")
