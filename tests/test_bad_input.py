"""Bad input, one row per case: the command, the setup it needs, and a fragment of the one line it must print.

The contract every row is held to: exit code 2, exactly one line on stderr (`error: ...`, no
traceback), and the work dir as it was (its whole tree hashed before and after; a fresh one is
not created). A new case is one `Row`.

Setups get an `Env` (the row's own tmp folder, its work dir, the shared tiny model) and return
the placeholders the row's arguments use (`{model}`, `{file}`, ...). The shared fixtures are built
once per module: a tiny model, a work dir where G1 is profiled, allocated and expanded, and, only
for the rows that need one, a copy where stage 1 left resume checkpoints.

The earlier rounds' one-command cases are rows here too (moved from test_pipeline.py and
test_cli.py). Cases that need more than one command, a second process or a check beyond the
one line stay with their subject, under the same contract: test_pipeline.py (a full disk, a
moved work dir's data), test_prepare.py (bad data files), test_workdir.py (locks, permissions),
test_integrity.py (changed or truncated weights and checkpoints, --no-verify),
test_distributed.py (launch settings), test_vocab_pipeline.py (--new-tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from layermoe.cli import app
from layermoe.core.manifest import StepStatus
from layermoe.core.workdir import Workdir
from layermoe.testing import make_tiny_model

runner = CliRunner()
LAYERS = 4
POSITIONS = 256  # the tiny model's max_position_embeddings
TRAIN = ["--max-steps", "2", "--seq-len", "32", "--micro-batch", "2", "--checkpoint-every", "1"]


def layermoe(workdir: Path, *args: str):
    return runner.invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})


def tree_hash(root: Path) -> str | None:
    """One digest of every path under `root` and every file's bytes (None: `root` does not exist)."""
    if not os.path.lexists(root):
        return None
    digest = hashlib.sha256(f"{Path(root).is_dir()} {Path(root).is_symlink()}".encode())
    for path in sorted(Path(root).rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "llama", num_layers=LAYERS, shared_direction=0.05)


@pytest.fixture(scope="module")
def expanded(tmp_path_factory, tiny) -> Path:
    """A work dir where profile, allocate and expand of G1 are done (read only: rows work on copies)."""
    workdir = tmp_path_factory.mktemp("runs") / "run"
    for args in (["profile", "--model", str(tiny), "--old", "en", "--new", "el,hu", "--tokens", "1500", "--neuron-top-n", "40"],
                 ["allocate", "--budget", "10", "--classifier-layers", "1"],
                 ["expand"]):
        result = layermoe(workdir, *args)
        assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, expanded) -> Path:
    """`expanded` plus a done stage 1 whose resume checkpoints are kept."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(expanded, workdir, symlinks=True)
    result = layermoe(workdir, "train", "--stage", "1", *TRAIN)
    assert result.exit_code == 0, result.output
    return workdir


@dataclass
class Env:
    tmp: Path  # the row's own folder
    workdir: Path  # the work dir the command runs in
    tiny: Path  # the shared tiny model: copy it before changing it

    def model_copy(self, name: str = "model") -> Path:
        target = self.tmp / name
        shutil.copytree(self.tiny, target)
        return target

    def own_base_model(self) -> Path:
        """Give the copied work dir its own copy of the base model, where its manifest looks for it."""
        manifest = Workdir(self.workdir).load()
        target = (self.workdir / manifest.base_model.path).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.tiny, target)
        manifest.base_model.absolute_path = str(target)
        Workdir(self.workdir).save(manifest)
        return target


@dataclass
class Row:
    id: str
    args: list[str]  # after `-w WORKDIR`; "{name}" is filled from what `setup` returns
    fragment: str  # in the one line on stderr ("{name}" filled too)
    workdir: str = "fresh"  # fresh (must not be created) | expanded | trained (copies)
    setup: Callable[[Env], dict] = field(default=lambda env: {})


# ------------------------------------------------------------------ setups


def no_tokenizer(env: Env) -> dict:
    model = env.model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return {"model": model}


def truncated_tokenizer(env: Env) -> dict:
    model = env.model_copy()
    text = (model / "tokenizer.json").read_text(encoding="utf-8")
    (model / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    return {"model": model}


def edit_config(**changes) -> Callable[[Env], dict]:
    def setup(env: Env) -> dict:
        model = env.model_copy()
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))
        return {"model": model}
    return setup


def write_into_model(name: str, content: bytes) -> Callable[[Env], dict]:
    def setup(env: Env) -> dict:
        model = env.model_copy()
        (model / name).write_bytes(content)
        return {"model": model}
    return setup


def empty_weights(env: Env) -> dict:
    model = env.model_copy()
    (model / "model.safetensors").write_bytes(b"")
    return {"model": model}


def bad_gguf(env: Env) -> dict:
    path = env.tmp / "t.gguf"
    # magic, version 3, tensor count 0, one key/value pair, then a key "length" far beyond the file
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + bytes(range(56)))
    return {"gguf": path}


def junk_gguf(env: Env) -> dict:
    path = env.tmp / "t.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(64))
    return {"gguf": path}


def binary_manifest(env: Env) -> dict:
    (env.workdir / "manifest.json").write_bytes(b"\xff\xfe\x00\x81" + os.urandom(200))
    return {}


def long_prompt(env: Env) -> dict:
    return {"prompt": "Καλημέρα σας, τι κάνετε σήμερα; " * 60}


def edited_base_tokenizer(env: Env) -> dict:
    model = env.own_base_model()
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    victim = next(t for t in vocab if len(t) > 3)
    vocab[victim + "x"] = vocab.pop(victim)
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    return {}


def edited_base_config(env: Env) -> dict:
    model = env.own_base_model()
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(config))
    return {}


def corrupt_resume_checkpoint(env: Env) -> dict:
    checkpoint = sorted((env.workdir / "g1" / "stage1-run" / "checkpoints").glob("step-*"))[-1]
    weights = checkpoint / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last float becomes a NaN
    weights.write_bytes(bytes(data))
    manifest = Workdir(env.workdir).load()  # as if stage 1 had been killed after that checkpoint
    manifest.generations[1].stage1.status = StepStatus.running
    Workdir(env.workdir).save(manifest)
    return {"checkpoint": checkpoint}


def write_file(name: str, content: bytes) -> Callable[[Env], dict]:
    def setup(env: Env) -> dict:
        path = env.tmp / name
        path.write_bytes(content)
        return {"file": path}
    return setup


def symlinked_workdir(env: Env) -> dict:
    link = env.tmp / "link"
    link.symlink_to(env.tmp / "nowhere" / "run")
    return {"link": link}


def manifest_edit(change: Callable) -> Callable[[Env], dict]:
    """Change the copied work dir's manifest (a dict of its JSON) before the command."""
    def setup(env: Env) -> dict:
        path = env.workdir / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return {}
    return setup


def _g1(data: dict) -> dict:
    return data["generations"][1]


def steps_pending(*steps: str) -> Callable[[Env], dict]:
    def change(data: dict) -> None:
        for step in steps:
            _g1(data)[step]["status"] = "pending"
    return manifest_edit(change)


def layer_count_mismatch(data: dict) -> None:
    _g1(data)["allocation"]["experts_per_layer"] = [2, 2, 2]


def newer_schema(data: dict) -> None:
    data["schema_version"] = 99


def no_base_model(data: dict) -> None:
    data["base_model"] = None


def gpt2_model(env: Env) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(env.tmp / "gpt2")
    return {"model": env.tmp / "gpt2"}


def recipe_with_unknown_option(env: Env) -> dict:
    recipe = env.tmp / "recipe.yaml"
    recipe.write_text(f"model: {env.tiny}\ngenerations:\n  - old: [en]\n    new: [el]\n    profile: {{tokenz: 300}}\n"
                      "    allocate: {budget: 6}\n")
    return {"file": recipe}


def foreign_output_folder(env: Env) -> dict:
    shutil.rmtree(env.workdir / "g1" / "expanded")
    (env.workdir / "g1" / "expanded").mkdir()
    (env.workdir / "g1" / "expanded" / "notes.txt").write_text("mine")
    return {}


# ------------------------------------------------------------------ the table

PROFILE = ["profile", "--old", "en", "--new", "el", "--model"]

ROWS = [
    # issue 24, 1: a model folder that is not a loadable model
    Row("model-no-tokenizer", [*PROFILE, "{model}"], "{model} has no tokenizer", setup=no_tokenizer),
    Row("model-truncated-tokenizer", [*PROFILE, "{model}"], "{model}/tokenizer.json", setup=truncated_tokenizer),
    Row("model-config-no-hidden-size", [*PROFILE, "{model}"], "{model}/config.json has no hidden_size",
        setup=edit_config(hidden_size=None)),
    Row("model-config-disagrees-with-weights", [*PROFILE, "{model}"],
        "{model}/model.safetensors: lm_head.weight is [512, 32], but config.json (vocab_size 512, hidden_size 48",
        setup=edit_config(hidden_size=48, head_dim=12)),
    Row("model-config-more-layers-than-weights", [*PROFILE, "{model}"], "has no tensor model.layers.4.",
        setup=edit_config(num_hidden_layers=6)),
    Row("model-tokenizer-not-a-tokenizer", [*PROFILE, "{model}"], "the tokenizer in {model} does not load",
        setup=write_into_model("tokenizer.json", b"{}")),
    Row("model-empty-weights", [*PROFILE, "{model}"], "{model}/model.safetensors is empty (0 bytes)", setup=empty_weights),
    # issue 24, 8: a GGUF header that announces more than the file holds
    Row("gguf-string-longer-than-file", [*PROFILE, "{gguf}"], "{gguf} is truncated or not a GGUF file", setup=bad_gguf),
    Row("gguf-junk-after-magic", [*PROFILE, "{gguf}"], "{gguf} is truncated or not a GGUF file", setup=junk_gguf),
    # issue 24, 2: an unreadable manifest
    Row("manifest-binary", ["status"], "manifest.json is not a text file", workdir="expanded", setup=binary_manifest),
    # issue 24, 3: a sequence longer than the model
    Row("train-seq-len-beyond-positions", ["train", "--stage", "1", "--seq-len", "100000"],
        f"--seq-len 100,000 is more than the {POSITIONS} positions of g1/expanded", workdir="expanded"),
    Row("generate-prompt-beyond-context", ["generate", "--prompt", "{prompt}", "--max-new-tokens", "8"],
        "more than the 256 positions of G1 (g1/expanded)", workdir="expanded", setup=long_prompt),
    Row("generate-new-tokens-beyond-context", ["generate", "--prompt", "Hello", "--max-new-tokens", "300"],
        "--max-new-tokens 300 leaves no room for the prompt in the 256 positions of G1 (g1/expanded)", workdir="expanded"),
    # issue 24, 4: usage errors in one line
    Row("usage-float-for-int", ["allocate", "--budget", "10.5"], "error: --budget expects an integer, got '10.5'",
        workdir="expanded"),
    Row("usage-word-for-int", ["profile", "--tokens", "abc"], "error: --tokens expects an integer, got 'abc'"),
    Row("usage-unknown-option", ["train", "--stage", "1", "--max-stepz", "2"],
        "error: train has no option --max-stepz: did you mean --max-steps?", workdir="expanded"),
    Row("usage-unknown-command", ["trian"], "error: no command 'trian': did you mean train?"),
    Row("usage-missing-value", ["allocate", "--budget"], "error: --budget needs a value", workdir="expanded"),
    Row("usage-missing-required", ["train"], "error: train needs --stage", workdir="expanded"),
    # issue 24, 5
    Row("eval-empty-langs", ["eval", "--langs", ""], "--langs is empty", workdir="expanded"),
    # issue 24, 6: the base model's tokenizer and config are checked with its weights
    Row("base-tokenizer-edited", ["expand", "--force"], "tokenizer.json does not match the sha256 recorded at profile",
        workdir="expanded", setup=edited_base_tokenizer),
    Row("base-config-edited", ["eval", "--model", "base", "--force"], "config.json does not match the sha256 recorded",
        workdir="expanded", setup=edited_base_config),
    # issue 24, 7: a corrupt resume checkpoint: the refusal is the only line
    Row("resume-checkpoint-corrupt", ["train", "--stage", "1", *TRAIN], "{checkpoint}/trainable.safetensors does not match",
        workdir="trained", setup=corrupt_resume_checkpoint),
    # issue 24, cases not tried before
    Row("max-steps-negative", ["train", "--stage", "1", "--max-steps", "-1"],
        "bad training setting max_steps: Input should be greater than 0", workdir="expanded"),
    Row("max-steps-not-integer", ["train", "--stage", "1", "--max-steps", "2.5"],
        "error: --max-steps expects an integer, got '2.5'", workdir="expanded"),
    Row("recipe-empty", ["train", "--stage", "1", "--recipe", "{file}"], "{file} is empty", workdir="expanded",
        setup=write_file("empty.yaml", b"")),
    Row("recipe-binary", ["train", "--stage", "1", "--recipe", "{file}"], "{file} is not a text file", workdir="expanded",
        setup=write_file("binary.yaml", b"\xff\xfe\x00\x81" * 16)),
    Row("run-recipe-empty", ["run", "{file}"], "recipe {file} is empty", setup=write_file("empty.yaml", b"")),
    Row("run-recipe-binary", ["run", "{file}"], "recipe {file} is not a text file",
        setup=write_file("binary.yaml", b"\xff\xfe\x00\x81" * 16)),
    Row("accelerate-config-missing", ["recipes", "fsdp3"], "no shipped recipe, accelerate config or task folder named 'fsdp3'"),
    Row("budget-zero", ["allocate", "--budget", "0", "--force"], "expert budget 0 is smaller than the 4 layers",
        workdir="expanded"),
    Row("workdir-dangling-symlink", ["-w", "{link}", *PROFILE, "{tiny}"], "work dir {link} is a symlink to", setup=symlinked_workdir),
    Row("workdir-symlink-no-manifest", ["-w", "{link}", "status"], "no layermoe manifest in {link}", setup=symlinked_workdir),
    Row("eval-data-empty-file", ["eval", "--data", "el={file}"], "{file} has no non-blank document", workdir="expanded",
        setup=write_file("empty.txt", b"")),
    Row("eval-data-binary-file", ["eval", "--data", "el={file}"], "{file}", workdir="expanded",
        setup=write_file("binary.txt", b"\x00\x81\xff\xfe" * 64 + os.urandom(256))),
    Row("generate-no-new-tokens", ["generate", "--prompt", "Hello", "--max-new-tokens", "0"],
        "--max-new-tokens must be at least 1, got 0", workdir="expanded"),
    Row("generate-empty-prompt", ["generate", "--prompt", ""], "--prompt is empty", workdir="expanded"),
    # ---- earlier rounds (moved here from test_pipeline.py and test_cli.py) ----
    Row("profile-unknown-language", ["profile", "--old", "en", "--new", "xx", "--model", "{tiny}"], "unknown language code 'xx'"),
    Row("profile-old-and-new", ["profile", "--old", "en", "--new", "en", "--model", "{tiny}"], "is both old and new"),
    Row("profile-no-new", ["profile", "--old", "en", "--model", "{tiny}"], "a new work dir needs --old and --new"),
    Row("profile-data-missing", [*PROFILE, "{tiny}", "--data", "el=missing.txt"], "missing.txt"),
    Row("profile-data-empty", [*PROFILE, "{tiny}", "--data", "el={file}"], "data for 'el': {file}",
        setup=write_file("el.txt", b"\n\n")),
    Row("profile-data-one-document", [*PROFILE, "{tiny}", "--data", "el={file}"],
        "data for 'el': {file} has 1 document; layermoe holds some out for eval, so it needs at least 2",
        setup=write_file("el.txt", b"only one document\n")),
    Row("profile-data-one-huge-document", [*PROFILE, "{tiny}", "--data", "el={file}"],
        "data for 'el': {file} has 1 document; layermoe holds some out for eval, so it needs at least 2",
        setup=write_file("el.txt", b"x" * 7_000_000 + b"\n")),
    Row("profile-unsupported-architecture", [*PROFILE, "{model}"],
        "unsupported architecture 'gpt2': layermoe supports llama, qwen2, qwen3, mistral, gemma, gemma2", setup=gpt2_model),
    Row("model-config-not-json", [*PROFILE, "{model}"], "cannot read {model}/config.json",
        setup=write_into_model("config.json", b"{not json")),
    Row("gguf-cut-in-header", [*PROFILE, "{file}"], "{file} is truncated or not a GGUF file",
        setup=write_file("cut.gguf", b"GGUF\x03\x00\x00\x00\x01\x00")),
    Row("run-recipe-unknown-option", ["run", "{file}"], "`generations.0.profile` has no option 'tokenz' (it takes ",
        setup=recipe_with_unknown_option),
    *[Row(f"allocate-{i}", ["allocate", "--force", *args], message, workdir="expanded") for i, (args, message) in enumerate([
        (["--budget", "3"], "expert budget 3 is smaller than the 4 layers"),
        (["--budget", "10", "--max-per-layer", "2"], "exceeds 4 layers x 2 experts per layer"),
        (["--budget", "10", "--classifier-layers", "5"], "classifier layers k=5 is outside 0..4"),
        (["--budget", "10", "--strategy", "best"], "unknown allocation strategy 'best'"),
        (["--budget", "10", "--new-experts", "6"], "give exactly one of --budget"),
        (["--strategy", "neuron", "--neuron-mapping", "linear", "--budget", "10"],
         "the linear neuron mapping (the authors' formula) is not budget-bound"),
        (["--budget", "10", "--min-experts", "2"], "--min-experts/--max-experts set the linear mapping"),
        (["--budget", "10", "--strategy", "neuron", "--rounding", "ceil"], "the neuron strategy always rounds exactly"),
        (["--strategy", "neuron", "--neuron-mapping", "linear", "--min-experts", "0"], "--min-experts must be at least 1"),
    ])],
    Row("allocate-layerwise-before-profile", ["allocate", "--budget", "10"],
        "layerwise allocation needs the similarity profile of G1: run `layermoe profile` first", workdir="expanded",
        setup=steps_pending("profile", "allocation", "expansion")),
    Row("allocate-no-base-model", ["allocate", "--budget", "10", "--force"], "manifest.json records no base model",
        workdir="expanded", setup=manifest_edit(no_base_model)),
    Row("allocate-newer-manifest", ["allocate", "--budget", "6"], "schema version 99, newer than this layermoe",
        workdir="expanded", setup=manifest_edit(newer_schema)),
    Row("status-no-manifest", ["status"], "error: no layermoe manifest in"),
    Row("expand-before-allocate", ["expand", "--force"],
        "G1 has no allocation yet: run `layermoe allocate --budget N` first, or pass --budget to `expand`",
        workdir="expanded", setup=steps_pending("allocation")),
    Row("expand-layer-count-mismatch", ["expand", "--force"], "the allocation has 3 layers but the model has 4",
        workdir="expanded", setup=manifest_edit(layer_count_mismatch)),
    Row("expand-foreign-output-folder", ["expand", "--force"], "exists and is not a layermoe checkpoint", workdir="expanded",
        setup=foreign_output_folder),
    Row("train-before-expand", ["train", "--stage", "1"],
        "expansion of G1 is not done yet (pending): run `layermoe expand` first", workdir="expanded",
        setup=steps_pending("expansion")),
    Row("train-stage-2-before-1", ["train", "--stage", "2"],
        "stage 1 of G1 is not done yet (pending): run `layermoe train --stage 1` first", workdir="expanded"),
    Row("train-stage-3", ["train", "--stage", "3"],
        "--stage 3: there are two training stages, 1 (new experts learn the new languages) and 2", workdir="expanded"),
    Row("train-recipe-not-yaml", ["train", "--stage", "1", "--recipe", "{file}"], "training recipe {file} is not valid YAML",
        workdir="expanded", setup=write_file("train.yaml", b"max_steps: [1\n")),
    *[Row(f"extend-{i}", ["extend", "--new", "bn", *args], message, workdir="expanded") for i, (args, message) in enumerate([
        (["--budget", "6", "--router-init", "bogus"], "unknown --router-init 'bogus': use expert0, source, mean, zeros, normal or reinit"),
        (["--budget", "2"], "expert budget 2 is smaller than the 4 layers"),
        (["--budget", "6", "--drift-tokens", "0"], "--drift-tokens must be positive"),
        (["--budget", "6", "--tokens", "0"], "--tokens must be positive"),
        (["--budget", "6", "--strategy", "best"], "unknown allocation strategy 'best'"),
        (["--budget", "6", "--expert-init", "best"], "unknown expert init 'best': use expert0 or routed"),
        (["--budget", "6", "--strategy", "neuron", "--neuron-mapping", "linear"],
         "the linear neuron mapping (the authors' formula) is not budget-bound: drop --budget/--new-experts"),
        (["--budget", "6", "--min-experts", "2"], "--min-experts/--max-experts set the linear mapping"),
    ])],
    Row("eval-dtype", ["eval", "--dtype", "float16"], "unknown dtype 'float16': use auto, float32 or bfloat16", workdir="expanded"),
    Row("eval-batch-size-0", ["eval", "--batch-size", "0"], "--batch-size 0: use a positive integer, auto or auto:N",
        workdir="expanded"),
    Row("eval-batch-size-emoji", ["eval", "--batch-size", "auto:x"], "--batch-size auto:x: use a positive integer, auto or auto:N",
        workdir="expanded"),  # no emoji for :x:
    Row("eval-batch-size-markup", ["eval", "--batch-size", "[red]"], "--batch-size [red]: use a positive integer, auto or auto:N",
        workdir="expanded"),  # nor markup
    Row("eval-data-unknown-language", ["eval", "--data", "xx={file}"],
        "error: unknown language code 'xx': use an ISO 639-1 or 639-3 code such as el, hu, tur (optionally with a script, "
        "e.g. zh-Hans)", workdir="expanded", setup=write_file("empty.txt", b"\n  \n")),
    Row("eval-data-no-spec", ["eval", "--data", "el"], "error: bad --data 'el': write LANG=SPEC, e.g. el=greek.txt or hu=builtin",
        workdir="expanded"),
    Row("generate-dtype", ["generate", "--prompt", "Hello", "--dtype", "int8"],
        "error: unknown dtype 'int8': use auto, float32 or bfloat16", workdir="expanded"),
    Row("generate-no-such-generation", ["generate", "--prompt", "Hello", "--model", "g7"],
        "error: --model g7: this work dir has no G7 (it has G0 to G1)", workdir="expanded"),
    Row("generate-no-such-model", ["generate", "--prompt", "Hello", "--model", "nowhere"],
        "error: --model nowhere: not base, current, gN (g0 = base) or a model folder / .gguf file", workdir="expanded"),
    Row("generate-blank-prompt", ["generate", "--prompt", " "], "error: --prompt is empty: give the text to continue",
        workdir="expanded"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(row: Row, tmp_path, request, tiny):
    if row.workdir == "fresh":
        workdir = tmp_path / "run"
    else:
        workdir = tmp_path / "work" / "run"
        shutil.copytree(request.getfixturevalue(row.workdir), workdir, symlinks=True)
    env = Env(tmp_path, workdir, tiny)
    values = {"tiny": str(tiny), **{k: str(v) for k, v in row.setup(env).items()}}
    args = [a.format(**values) for a in row.args]
    before = tree_hash(workdir)
    if args[0] == "-w":  # the row gives its own work dir
        workdir = Path(args[1])
        before = tree_hash(workdir)
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
    else:
        result = layermoe(workdir, *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert row.fragment.format(**values) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert tree_hash(workdir) == before


def test_help_is_typers_own():
    """Usage errors are one line; `--help` is left as Typer draws it."""
    result = runner.invoke(app, ["allocate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--budget" in result.stdout and "Usage:" in result.stdout
    result = runner.invoke(app, [], env={"COLUMNS": "200"})  # no arguments: the help, as before
    assert "Usage:" in result.output and "error:" not in result.output
