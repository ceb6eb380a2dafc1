"""`eval --tasks` through the CLI on a tiny model: the task scores printed, lm-eval's noise silenced,
task data checked before any model loads, the shipped local task, the benchmark names the README gives."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.workdir import Workdir
from layermoe.pipeline.eval_cache import ModelUnderTest
from layermoe.pipeline.recipes import LM_EVAL_TASKS_DIR
from layermoe.testing import make_tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'layermoe[eval]'")

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
TASK = "layermoe_tiny_mc"
EVAL = ["eval", "--max-tokens", "200", "--tasks", TASK, "--tasks-path", str(LM_EVAL_TASKS_DIR)]
NOISE = ("pretrained` model kwarg is not of type", "HF model type is neither marked as CausalLM",
         "fatal: not a git repository", "Passed an already-initialized model", "Custom kwargs can be passed")


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    """A work dir where profile, allocate and expand of G1 are done (a 2-layer tiny model)."""
    tiny = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=2, shared_direction=0.05)
    workdir = tmp_path_factory.mktemp("runs") / "run"
    for args in (("profile", "--model", str(tiny), "--old", "en", "--new", "el", "--tokens", "400", "--neuron-top-n", "20"),
                 ("allocate", "--budget", "4", "--classifier-layers", "1"), ("expand",)):
        result = layermoe(workdir, *args)
        assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture
def workdir(expanded, tmp_path) -> Path:
    copy = tmp_path / "runs" / "run"  # the depth of the original: the base model's relative path still holds
    shutil.copytree(expanded, copy)
    return copy


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The label of every model `eval` loads, in order."""
    calls: list[str] = []
    original = ModelUnderTest.load

    def spy(self, device):
        if self._loaded is None:  # loaded now, not the copy already in memory
            calls.append(self.label)
        return original(self, device)

    monkeypatch.setattr(ModelUnderTest, "load", spy)
    return calls


def _table(output: str, title: str) -> list[list[str]]:
    """The header and body rows of the Rich table under `title` in `output`, cells stripped; a line
    that continues the row above (a name folded on a narrow terminal) is joined to it."""
    lines = output[output.index(title):].splitlines()
    rows: list[list[str]] = []
    for line in lines[1:]:
        if line.startswith("└"):
            break
        if line[:1] in ("│", "┃"):
            cells = [cell.strip() for cell in line.strip(line[0]).split(line[0])]
            if rows and line[0] == "│" and not any(cells[2:]) and len(rows) > 1:
                rows[-1] = [a + b for a, b in zip(rows[-1], cells)]
            else:
                rows.append(cells)
    return rows


# ---------------------------------------------------------------- the task scores


def test_eval_tasks_prints_every_metric_beside_the_base_models_and_again_from_the_cache(workdir, loads):
    result = layermoe(workdir, *EVAL, "--model", "base")
    assert result.exit_code == 0, result.output
    base = Workdir(workdir).load().generations[0].eval.lm_eval
    acc = base["results"][TASK]["acc,none"]
    rows = _table(result.stdout, "lm-eval tasks — base")
    assert rows[0] == ["task", "metric", "samples", "value", "± stderr"]  # no base column for the base model itself
    assert [row[:3] for row in rows[1:]] == [[TASK, "acc", "6"], [TASK, "acc_norm", "6"]]
    assert rows[1][3] == f"{acc:.4f}"
    stderr = base["results"][TASK]["acc_stderr,none"]
    assert isinstance(stderr, float) and rows[1][4] == f"±{stderr:.4f}"

    result = layermoe(workdir, *EVAL)  # G1's expanded model: the base model's figures beside its own
    assert result.exit_code == 0, result.output
    rows = _table(result.stdout, "lm-eval tasks — g1/expanded")
    assert rows[0] == ["task", "metric", "samples", "base", "value", "± stderr", "Δ"]
    g1 = Workdir(workdir).load().generations[1].eval.lm_eval
    for row, metric in zip(rows[1:], ("acc", "acc_norm")):
        assert row[:4] == [TASK, metric, "6", f"{base['results'][TASK][metric + ',none']:.4f}"]
        assert row[4] == f"{g1['results'][TASK][metric + ',none']:.4f}"
        assert row[6] == "+0.0000"  # the expanded model computes what the base model does
    assert loads == ["base", "g1/expanded"]  # once each (bits per byte and lm-eval); the base model's figures cached

    again = layermoe(workdir, *EVAL)  # every figure from the record: the table still printed
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stderr
    assert _table(again.stdout, "lm-eval tasks — g1/expanded") == rows
    assert loads == ["base", "g1/expanded"]


def test_lm_eval_table_names_are_whole_and_missing_stderr_is_a_dash():
    from types import SimpleNamespace

    from rich.console import Console

    from layermoe.pipeline.evaluate import lm_eval_table

    long = "global_mmlu_full_el_high_school_government_and_politics"
    lm_eval = {"num_fewshot": 5, "limit": None, "results": {
        long: {"acc,none": 0.25, "acc_stderr,none": "N/A", "acc_norm,none": 0.5, "acc_norm_stderr,none": None},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.01}},
        "n_samples": {long: {"original": 120, "effective": 20}}}
    base = SimpleNamespace(lm_eval={**lm_eval, "results": {long: {"acc,none": 0.5}}})
    record = SimpleNamespace(model="g1/stage2", lm_eval=lm_eval)
    manifest = SimpleNamespace(generations=[SimpleNamespace(eval=base)])
    console = Console(width=100, record=True)
    console.print(lm_eval_table(manifest, record))
    text = console.export_text()
    assert "…" not in text  # a long name folds onto the next lines, whole, and every figure shows
    rows = {(row[0], row[1]): row for row in _table(text, "lm-eval tasks") if len(row) == 7}
    rows = {(task, metric.replace(" ", "").replace("(", " (")): row for (task, metric), row in rows.items()}
    assert set(rows) == {("task", "metric"), (long, "acc"), (long, "acc_norm"), ("gsm8k", "exact_match (strict-match)")}
    assert rows[long, "acc"][2:] == ["20 of 120", "0.5000", "0.2500", "—", "-0.2500"]
    assert rows[long, "acc_norm"][2:] == ["20 of 120", "—", "0.5000", "—", "—"]
    assert rows["gsm8k", "exact_match (strict-match)"][2:] == ["—", "—", "0.1250", "±0.0100", "—"]
    # another few-shot setting: the base model's figures are not comparable, so none are shown
    base.lm_eval["num_fewshot"] = 0
    console = Console(width=120, record=True)
    console.print(lm_eval_table(manifest, record))
    rows = {(row[0], row[1]): row for row in _table(console.export_text(), "lm-eval tasks") if len(row) == 7}
    assert rows[long, "acc"][3] == "—" and rows[long, "acc"][6] == "—"


# ---------------------------------------------------------------- lm-eval's noise


def test_run_lm_eval_keeps_lm_evals_noise_off_the_terminal(tmp_path, monkeypatch, capfd, caplog):
    import lm_eval.evaluator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermoe.evaluation.lm_eval import run_lm_eval

    path = make_tiny_model(tmp_path / "tiny", "llama", seed=3)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not a git repository: lm-eval's `git describe` complains there
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    git_hash, filters = lm_eval.evaluator.get_git_commit_hash, logging.getLogger("lm_eval.models.huggingface").filters[:]
    caplog.set_level(logging.WARNING)
    capfd.readouterr()
    out = run_lm_eval(model, tok, [TASK], include_path=LM_EVAL_TASKS_DIR, include_defaults=False)
    assert out["n_samples"][TASK]["effective"] == 6
    said = capfd.readouterr().err + caplog.text
    for noise in NOISE:
        assert noise not in said
    # scoped to the call: lm-eval as it was afterwards, and its other warnings still shown during it
    assert lm_eval.evaluator.get_git_commit_hash is git_hash
    assert logging.getLogger("lm_eval.models.huggingface").filters == filters
    caplog.clear()
    from layermoe.evaluation.lm_eval import quiet_lm_eval

    with quiet_lm_eval():
        logging.getLogger("lm_eval.models.huggingface").warning("a real problem")
        logging.getLogger("lm_eval.models.huggingface").warning("HF model type is neither marked as CausalLM or Seq2SeqLM. ...")
        logging.getLogger("lm_eval.api.task").warning("t: Custom kwargs can be passed to `--metadata` in console")
    assert "a real problem" in caplog.text and "neither marked" not in caplog.text and "Custom kwargs" not in caplog.text


# ---------------------------------------------------------------- task data before the model


def _hub_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hub_only.yaml").write_text(
        "task: layermoe_hub_only\n"
        "dataset_path: layermoe-tests/no-such-dataset-anywhere\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    return folder


def test_a_task_whose_data_cannot_load_is_refused_before_any_model_loads(workdir, tmp_path, loads, monkeypatch):
    from tests.test_bad_input import tree_hash

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = _hub_task(tmp_path / "tasks")
    before = tree_hash(workdir)
    result = layermoe(workdir, "eval", "--max-tokens", "200", "--tasks", "layermoe_hub_only", "--tasks-path", str(tasks))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: the data of lm-eval task layermoe_hub_only could not be loaded ("), lines
    assert "check the network or the datasets cache" in lines[0]
    assert loads == []  # neither the base model (its bits per byte come first) nor G1's was loaded
    assert tree_hash(workdir) == before


def test_an_unknown_task_is_refused_before_any_model_loads(workdir, loads):
    result = layermoe(workdir, "eval", "--max-tokens", "200", "--tasks", f"{TASK},no_such_task_xyz",
                      "--tasks-path", str(LM_EVAL_TASKS_DIR))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown lm-eval task(s): no_such_task_xyz"), lines
    assert loads == []


def test_check_tasks_load_hands_the_loaded_tasks_to_the_run(monkeypatch):
    """The data is loaded once: run_lm_eval gets the task objects the check built, not their names."""
    import lm_eval

    from layermoe.evaluation.lm_eval import check_tasks_load

    loaded = check_tasks_load([TASK], include_path=LM_EVAL_TASKS_DIR)
    assert loaded.names == [TASK] and len(loaded.objects) == 1
    assert not isinstance(loaded.objects[0], str) and loaded.objects[0].dataset is not None
    assert loaded.task_manager is not None
    seen = {}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: seen.update(kwargs) or {"results": {}})
    from layermoe.evaluation.lm_eval import run_lm_eval

    class Model:  # what the bridge asks of a model, no more
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    monkeypatch.setattr("lm_eval.models.huggingface.HFLM.__init__", lambda self, **kwargs: None)
    run_lm_eval(Model(), None, [TASK], loaded=loaded)
    assert seen["tasks"] == loaded.objects and seen["task_manager"] is loaded.task_manager


# ---------------------------------------------------------------- the shipped task and the README


def test_the_shipped_task_folder_is_listed_and_found_by_name(tmp_path):
    assert {p.name for p in LM_EVAL_TASKS_DIR.iterdir() if p.is_file()} >= {f"{TASK}.yaml", "load.py", "tiny_mc.jsonl"}
    result = runner.invoke(app, ["recipes", "lm-eval-tasks"])
    assert result.exit_code == 0 and Path(result.stdout.strip()) == LM_EVAL_TASKS_DIR
    listing = runner.invoke(app, ["recipes"], env={"COLUMNS": "250"})
    assert "lm-eval-tasks" in listing.stdout and "eval --tasks-path" in listing.stdout
    command = "layermoe eval --tasks layermoe_tiny_mc --tasks-path $(layermoe recipes lm-eval-tasks)"
    assert command in README.read_text()


def _readme_task_names() -> list[str]:
    """Every task name in the README's table of the papers' benchmarks (backquoted, no placeholder)."""
    text = README.read_text()
    start = text.index("<!-- lm-eval task names: start -->")
    table = text[start:text.index("<!-- lm-eval task names: end -->")]
    names = re.findall(r"`([a-z][A-Za-z0-9_]*)`", table)
    assert len(names) > 20
    return names


@pytest.mark.slow
def test_every_task_name_the_readme_gives_is_one_lm_eval_knows():
    from lm_eval.tasks import TaskManager

    manager = TaskManager()  # the whole index: ~10 s
    known = set(manager.all_tasks)
    assert [name for name in _readme_task_names() if name not in known] == []


# ---------------------------------------------------------------- several benchmark runs on one model


def _two_task_folder(tmp_path: Path) -> Path:
    """The shipped task folder plus a second task of the same questions under another name."""
    folder = tmp_path / "tasks"
    shutil.copytree(LM_EVAL_TASKS_DIR, folder)
    text = (folder / f"{TASK}.yaml").read_text()
    (folder / "second.yaml").write_text(text.replace(f"task: {TASK}", "task: layermoe_tiny_mc_second"))
    return folder


def test_benchmarks_run_one_after_another_on_a_model_keep_each_others_scores(workdir, tmp_path, monkeypatch):
    """The papers score each benchmark with its own shot count, so one `eval --tasks` per benchmark: each run adds
    its scores to the model's record (a later run replaced them all), a task asked again with the settings it was
    scored with is not run again, and one asked with other settings is run again and replaces its scores alone."""
    from layermoe.pipeline import evaluate

    folder, second = _two_task_folder(tmp_path), "layermoe_tiny_mc_second"
    runs: list[tuple[list[str], int | None]] = []
    real_run = evaluate.run_lm_eval

    def counted(model, tokenizer, tasks, **kwargs):
        runs.append((list(tasks), kwargs.get("num_fewshot")))
        return real_run(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(evaluate, "run_lm_eval", counted)
    ask = ["eval", "--max-tokens", "200", "--tasks-path", str(folder)]
    assert layermoe(workdir, *ask, "--tasks", TASK).exit_code == 0
    result = layermoe(workdir, *ask, "--tasks", second, "--num-fewshot", "1")
    assert result.exit_code == 0, result.output
    record = Workdir(workdir).load().generations[1].eval.lm_eval
    assert sorted(record["results"]) == [TASK, second]
    assert record["settings"][TASK]["num_fewshot"] is None and record["settings"][second]["num_fewshot"] == 1
    rows = _table(result.stdout, "lm-eval tasks — g1/expanded")
    assert rows[0][:4] == ["task", "shots", "metric", "samples"]  # the settings differ between rows: a column
    assert [row[:2] for row in rows[1:]] == [[TASK, "—"], [TASK, "—"], [second, "1"], [second, "1"]]

    again = layermoe(workdir, *ask, "--tasks", TASK)  # scored with these settings already: from the record
    assert again.exit_code == 0 and "up to date" in again.stderr, again.output
    assert runs == [([TASK], None), ([second], 1)]
    result = layermoe(workdir, *ask, "--tasks", TASK, "--num-fewshot", "1")  # other settings: run again
    assert result.exit_code == 0, result.output
    assert runs[-1] == ([TASK], 1)
    record = Workdir(workdir).load().generations[1].eval.lm_eval
    assert sorted(record["results"]) == [TASK, second] and record["settings"][TASK]["num_fewshot"] == 1
    assert [run["tasks"] for run in record["runs"]] == [[second], [TASK]]


def test_merged_runs_drop_a_run_whose_scores_a_later_one_replaced():
    from layermoe.evaluation.lm_eval import merge_benchmark_runs, scores_known

    def run(tasks, shots, results):
        return {"lm_eval_version": "0.4.13", "tasks": tasks, "num_fewshot": shots, "limit": None,
                "results": {key: {"acc,none": 0.5} for key in results}, "n_samples": {}}

    group = run(["belebele_*"], 5, ["belebele_ell_Grek", "belebele_hun_Latn"])
    merged = merge_benchmark_runs(None, group)
    assert scores_known(merged, ["belebele_*"], 5, None) and not scores_known(merged, ["belebele_*"], 0, None)
    merged = merge_benchmark_runs(merged, run(["belebele_ell_Grek"], 0, ["belebele_ell_Grek"]))
    assert sorted(merged["results"]) == ["belebele_ell_Grek", "belebele_hun_Latn"]
    assert merged["settings"]["belebele_hun_Latn"]["num_fewshot"] == 5  # kept, with what it was scored with
    assert merged["settings"]["belebele_ell_Grek"]["num_fewshot"] == 0
    assert not scores_known(merged, ["belebele_*"], 5, None)  # one of its scores is no longer a 5-shot one
    assert scores_known(merged, ["belebele_ell_Grek"], 0, None)
    old_style = run(["arc_hu"], 25, ["arc_hu"])  # a record written before runs were kept: its own settings
    assert scores_known(old_style, ["arc_hu"], 25, None) and not scores_known(old_style, ["arc_hu"], 0, None)
