"""The shape of the code: each step's options declared once, no import circles, a light CLI start,
the old import name and old checkpoints still working."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from typer.main import get_command

import layermoe
from layermoe import cli
from layermoe.core.options import flags_from, flags_of
from layermoe.pipeline import options as step_options
from layermoe.pipeline.recipes import GenerationRecipe
from layermoe.training.config import TrainConfig

PACKAGE = Path(layermoe.__file__).parent
LEGACY_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-layermoe_cli-0.1.0"


def _step_function(target: str):
    module, name = target.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


@pytest.mark.parametrize("name, model, target", [(c[0], c[1], c[2]) for c in cli.COMMANDS])
def test_a_commands_flags_the_model_and_the_step_are_one_declaration(name, model, target):
    """Every flag of `layermoe NAME` is a field of the step's options model, with that field's
    default and help; the step function takes that very model."""
    command = get_command(cli.app).commands[name]
    params = {p.name: p for p in command.params if p.name != "help"}
    flags = {flag.name: flag for flag in cli._fields(model)}
    assert set(params) == set(flags)
    for param_name, flag in flags.items():
        param, field = params[param_name], flag.field
        assert param.help == (field.description or None)
        if not param.param_type_name == "argument":
            assert set(param.opts) == set(flags_of(flag.path[-1], field))
        if not field.is_required() and not isinstance(field.get_default(call_default_factory=True), list):
            assert param.default == field.get_default(call_default_factory=True) or param.default is None
    step = _step_function(target)
    hints = typing.get_type_hints(step)
    assert model in [typing.get_args(h)[0] if typing.get_origin(h) else h for h in hints.values()] + \
        [a for h in hints.values() for a in typing.get_args(h)]


def test_recipe_sections_are_the_steps_options_models():
    fields = GenerationRecipe.model_fields
    assert fields["profile"].annotation is step_options.ProfileOptions
    assert fields["allocate"].annotation is step_options.AllocateOptions
    assert fields["expand"].annotation is step_options.ExpandOptions
    assert typing.get_args(fields["eval"].annotation)[0] is step_options.EvalOptions
    assert typing.get_args(fields["stage1"].annotation)[0] is TrainConfig
    # extend runs the same three models, and `train` takes TrainConfig's own fields as its flags
    extend = step_options.ExtendOptions.model_fields
    assert [flags_from(extend[n]).model for n in ("profile", "allocate", "expand")] == [
        step_options.ProfileOptions, step_options.AllocateOptions, step_options.ExpandOptions]
    assert flags_from(step_options.TrainOptions.model_fields["settings"]).model is TrainConfig


def test_a_default_is_written_once():
    """The profile's 100,000 tokens and 8,192-token batches: one constant, read by the options and the library."""
    from layermoe.profiling import similarity
    from layermoe.profiling.settings import PROFILE_BATCH_TOKENS, PROFILE_TOKENS

    assert step_options.ProfileOptions.model_fields["tokens"].default == PROFILE_TOKENS
    assert inspect.signature(similarity.profile_model).parameters["tokens_per_language"].default == PROFILE_TOKENS
    assert inspect.signature(similarity.profile_model).parameters["batch_tokens"].default == PROFILE_BATCH_TOKENS
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert source.count("100_000") <= 2 and "= 8192" not in source.replace("PROFILE_BATCH_TOKENS = 8192", "")


def test_tokens_per_language_goes_from_the_flag_to_the_data_selection():
    """`train --tokens-per-language N`: the flag is DataSelection's field, nested in TrainConfig, read by prepare."""
    from layermoe.data.selection import DataSelection

    flag = next(f for f in cli._fields(step_options.TrainOptions) if f.path[-1] == "tokens_per_language")
    assert flag.path == ("settings", "data", "tokens_per_language")
    assert flag.field is DataSelection.model_fields["tokens_per_language"]
    config = TrainConfig(stage=1, data={"tokens_per_language": 5000})
    assert config.data.tokens_per_language == 5000
    assert TrainConfig(stage=1, tokens_per_language=5000) == config  # flat recipe keys still work
    assert config.model_dump()["tokens_per_language"] == 5000  # and the stored dump stays flat


def _module_imports(path: Path) -> set[str]:
    """First-party modules imported at the top level of a file (what Python runs on import)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("layermoe"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("layermoe"))
    return found


def test_the_import_graph_has_no_circle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("layermoe",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_command_line_starts_without_torch():
    code = "import sys, layermoe.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_old_import_name_warns_and_resolves_to_the_new_modules():
    code = ("import warnings, sys\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import layermoe_cli\n"
            "import layermoe_cli.models, layermoe.modeling.base\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "print(any(issubclass(x.category, DeprecationWarning) for x in w), layermoe_cli.models is layermoe.modeling.base,"
            " 'layermoe' in CONFIG_MAPPING)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]


def test_a_checkpoint_written_before_the_rename_still_loads():
    """tests/data/checkpoint-layermoe_cli-0.1.0 was written by `layermoe_cli` 0.1.0 (two generations,
    a classifier); today's classes and AutoModelForCausalLM load it to the same logits."""
    from transformers import AutoModelForCausalLM

    from layermoe.modeling import LayermoeForCausalLM, load_layermoe

    expected = torch.load(LEGACY_CHECKPOINT / "expected_logits.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (load_layermoe(LEGACY_CHECKPOINT), AutoModelForCausalLM.from_pretrained(LEGACY_CHECKPOINT).eval()):
            assert isinstance(model, LayermoeForCausalLM) and model.config.num_generations == 2
            with torch.no_grad():
                assert torch.allclose(model(expected["ids"]).logits, expected["logits"], atol=1e-5)


def test_options_models_import_no_model_library():
    """pipeline/options.py is what `--help` reads: pydantic, not torch."""
    assert all(issubclass(c[1], BaseModel) for c in cli.COMMANDS)
    code = "import sys, layermoe.pipeline.options; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
