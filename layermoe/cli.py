"""The `layermoe` command line. Thin: each command is built from its step's options model
(`pipeline/options.py`: every flag, default and help text is declared there once) and calls one
function of a pipeline step with an instance of that model.

The pipeline steps are imported only when their command runs (they load torch and transformers),
so `layermoe --help` starts in a moment.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.markup import escape
from typer.core import TyperGroup

from layermoe import __version__
from layermoe.core.console import console, err_console
from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import set_verification
from layermoe.core.options import first_error, flags_from, flags_of, is_comma_list, on_cli
from layermoe.core.workdir import StepAlreadyDone, Workdir, disk_full_message
from layermoe.pipeline import options as step_options


def _flag_name(param) -> str:
    """How the user wrote (or would write) a parameter: its long flag, else its first one, else its name."""
    if param is None:
        return "an argument"
    opts = list(getattr(param, "opts", []) or [])
    long = [o for o in opts if o.startswith("--")]
    return (long or opts or [(param.name or "").upper()])[0]


def _known_options(ctx) -> list[str]:
    if ctx is None:
        return []
    return [o for p in ctx.command.get_params(ctx) for o in getattr(p, "opts", []) if o.startswith("--")]


# Typer (from 0.22 on, its own copy of click) reports a bad value from pydantic; click, in its own words.
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "decimal": "a number"}
_NOT_VALID = re.compile(r"^'?(?P<value>.*?)'? is not a valid (?P<kind>[\w ]+?)\.?$", re.S)


def _bad_value(error) -> tuple[object, str] | None:
    """(the value given, what was expected) of a bad parameter value, or None if unknown."""
    cause = error.__cause__
    if cause is not None and hasattr(cause, "errors"):
        first = cause.errors()[0]
        kind = _KINDS.get(first.get("type", "").split("_")[0])
        if kind is not None:
            return first.get("input"), kind
    found = _NOT_VALID.match(str(getattr(error, "message", "")).strip())
    if found:
        kind = found["kind"]
        return found["value"], f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"
    return None


def usage_message(error) -> str:
    """A click/Typer usage error as one line in the project's style (without the `error:` prefix)."""
    kinds = {c.__name__ for c in type(error).__mro__}  # by name: Typer may carry its own click
    ctx = error.ctx
    command = ctx.info_name if ctx is not None and ctx.parent is not None else None
    where = command or "layermoe"
    helps = f"see `layermoe {command + ' ' if command else ''}--help`"
    if "NoSuchOption" in kinds:
        near = error.possibilities or difflib.get_close_matches(error.option_name, _known_options(ctx))
        return f"{where} has no option {error.option_name}: " + (f"did you mean {near[0]}?" if near else helps)
    if "NoSuchCommand" in kinds or str(error.message).startswith("No such command"):
        name = getattr(error, "command_name", None) or str(error.message).split("'")[1]
        near = difflib.get_close_matches(name, list(ctx.command.commands) if ctx is not None else [])
        return f"no command {name!r}: " + (f"did you mean {near[0]}?" if near else "see `layermoe --help`")
    if "MissingParameter" in kinds:
        return f"{where} needs {_flag_name(error.param)}: {helps}"
    if "BadParameter" in kinds:
        flag = _flag_name(error.param)
        bad = _bad_value(error)
        if bad is not None:
            return f"{flag} expects {bad[1]}, got {str(bad[0])!r}"
        return f"{flag}: {str(error.message).strip().rstrip('.')}"
    message = (error.format_message().strip().splitlines() or ["bad usage"])[0]
    if "BadOptionUsage" in kinds and "requires an argument" in message:
        return f"{error.option_name} needs a value"
    return f"{message[:1].lower()}{message[1:].rstrip('.')}: {helps}"


_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except _USAGE_ERROR as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `layermoe` alone: the help, as Typer shows it
            raise
        _error(usage_message(error))


class _OneLineUsageErrors(TyperGroup):
    """Typer's group, with usage errors (a typo, a word for a number) as one line, exit code 2.

    `--help`, and the help shown when no command is given, stay Typer's own.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors():  # the command's name and its own options are parsed here
            return super().invoke(ctx)


app = typer.Typer(
    name="layermoe",
    cls=_OneLineUsageErrors,
    help="Teach a dense causal LM new languages without forgetting the old ones (LayerMoE, ACL 2025).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"layermoe {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    workdir: Path = typer.Option(
        Path("layermoe-run"), "--workdir", "-w", envvar="LAYERMOE_WORKDIR", help="Work dir holding manifest.json and all outputs."
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify", envvar="LAYERMOE_NO_VERIFY",
        help="Read models and checkpoints without checking them against the sha256 recorded when they were written (a warning says so).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:

    set_verification(not no_verify)
    ctx.obj = Workdir(workdir)


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars are noise."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging  # lazy: loads transformers
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from layermoe.compat import silence_gguf_progress  # lazy: imports torch

    silence_gguf_progress()  # the GGUF conversion's own bar


def _error(message: str, exit_code: int = 2):
    # the message is text, not markup: a path or value with [brackets] or :x: is shown as given
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False, emoji=False)
    raise typer.Exit(exit_code)


def _call(step: Callable, *args, **kwargs):
    """Run one pipeline step; bad input becomes one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        return step(*args, **kwargs)
    except LayermoeError as e:
        _error(str(e), e.exit_code)
    except StepAlreadyDone as e:
        console.print(f"[green]✓[/] {escape(str(e))}", soft_wrap=True, highlight=False, emoji=False)
        raise typer.Exit(0)
    except (OSError, RuntimeError) as e:  # a full disk is the user's to fix; anything else is a bug: a traceback
        workdir = next((a for a in args if isinstance(a, Workdir)), None)
        message = disk_full_message(workdir.root, e) if workdir is not None else None
        if message is None:
            raise
        _error(message)


# ---------------------------------------------------------------------------------------------
# Commands from options models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Flag:
    """One command-line parameter: where its value goes in the options (a path of field names)."""

    name: str  # the Python parameter name Typer sees: the path joined by "__"
    path: tuple[str, ...]
    field: Any  # the pydantic FieldInfo it comes from


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[_Flag]:
    """The command-line parameters of `model`: its fields with flags, and those of nested settings."""
    flags = []
    for name, field in model.model_fields.items():
        nested = flags_from(field)
        annotation = field.annotation
        wanted = None if only is None else tuple(o.split(".", 1)[1] for o in only if o.startswith(name + "."))
        if nested is not None:
            flags += _fields(nested.model, prefix + (name,), nested.only)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if wanted:  # a nested model reached by dotted names, e.g. TrainConfig's data.tokens_per_language
                flags += _fields(annotation, prefix + (name,), wanted)
        elif on_cli(field) and (only is None or name in only):
            flags.append(_Flag("__".join(prefix + (name,)), prefix + (name,), field))
    return flags


def _cli_type(field) -> Any:
    """The type Typer parses a field's flag as (validation is the model's, after parsing)."""
    annotation = field.annotation
    if is_comma_list(field):
        return Optional[str]
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return list[str]
    if origin is typing.Literal:
        return str
    if args and len(args) == 1 and origin is not None:  # X | None
        inner = args[0]
        return Optional[str if typing.get_origin(inner) is typing.Literal else inner]
    return annotation


def _typer_parameter(flag: _Flag) -> inspect.Parameter:
    field = flag.field
    extra = (field.json_schema_extra or {}).get("typer", {})
    settings = {k: v for k, v in extra.items() if k != "argument"}
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    if is_comma_list(field) and default is not ...:
        default = None if default in ([], None) else ",".join(default)
    if extra.get("argument"):
        info = typer.Argument(default, help=field.description or None, **settings)
    else:
        info = typer.Option(default, *flags_of(flag.path[-1], field), help=field.description or None, **settings)
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(field))


def _given(ctx: typer.Context, flags: list[_Flag], values: dict) -> dict:
    """The options as nested dicts, holding only what the command line gave (defaults stay the model's)."""
    out: dict = {}
    for flag in flags:
        source = ctx.get_parameter_source(flag.name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # by name: Typer may carry its own click
            continue
        where = out
        for part in flag.path[:-1]:
            where = where.setdefault(part, {})
        where[flag.path[-1]] = values[flag.name]
    return out


def _flag_of_error(err: ValidationError, flags: list[_Flag]) -> str:
    location, message = first_error(err)
    for flag in flags:
        if location.startswith(".".join(flag.path)):
            return f"{flags_of(flag.path[-1], flag.field)[0]}: {message}"
    return f"{location}: {message}"


def command(name: str, options_model: type[BaseModel], step: str, summary: str, epilog: str) -> None:
    """Register `layermoe NAME`: flags from `options_model`, then `step` ("module:function") is called
    as step(workdir, options)."""
    flags = _fields(options_model)

    def run(ctx: typer.Context, **values) -> None:
        try:
            options = options_model(**_given(ctx, flags, values))
        except ValidationError as err:
            _error(_flag_of_error(err, flags))
        module, function = step.split(":")
        # lazy on purpose: a step's module loads torch and transformers (start-up time of `--help`)
        _call(getattr(importlib.import_module(module), function), ctx.obj, options)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    parameters = [context] + [_typer_parameter(flag) for flag in flags]
    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    run.__doc__ = summary
    run.__name__ = name
    app.command(name, epilog=epilog)(run)


COMMANDS = [
    ("profile", step_options.ProfileOptions, "layermoe.pipeline.profile:run_profile",
     "Measure how similar languages are at every layer (Eq. 8-9) and count language-specific neurons.",
     "Example: layermoe profile --model Qwen/Qwen1.5-1.8B --old en,zh,es --new el,hu,tr --data el=el.txt"),
    ("allocate", step_options.AllocateOptions, "layermoe.pipeline.allocate:run_allocate",
     "Decide how many experts each layer gets (Eq. 10, or from language-specific neurons).",
     "Example: layermoe allocate --budget 72   (24 layers: 24 original + 48 new experts); "
     "layermoe allocate --strategy neuron --neuron-mapping linear --min-experts 1 --max-experts 6"),
    ("expand", step_options.ExpandOptions, "layermoe.pipeline.expand:run_expand",
     "Upcycle the model into the layer-wise mixture of experts; save a Hugging Face checkpoint.",
     "Example: layermoe expand --budget 72"),
    ("prepare", step_options.PrepareOptions, "layermoe.pipeline.prepare:run_prepare",
     "Read, split, tokenise and pack a stage's training data once (train runs it when needed).",
     "Example: layermoe prepare --stage 1 --tokens-per-language 50000000"),
    ("train", step_options.TrainOptions, "layermoe.pipeline.train:run_train",
     "Train stage 1 or 2 (resumes from the last checkpoint after a crash).",
     "Example: layermoe train --stage 1 --max-steps 1000 && layermoe train --stage 2"),
    ("eval", step_options.EvalOptions, "layermoe.pipeline.evaluate:run_eval",
     "Bits per byte on held-out text and your own test sets, old vs new languages, routing health (one pass, cached).",
     "Example: layermoe eval --max-tokens 20000 --data el=flores/ell_Grek.devtest.txt"),
    ("generate", step_options.GenerateOptions, "layermoe.pipeline.generate:run_generate",
     "Continue a prompt with a model of the lineage (KV cache, streamed). Read-only: runs even while training.",
     'Example: layermoe generate --prompt "Καλημέρα, σήμερα" --model current --compare base'),
    ("extend", step_options.ExtendOptions, "layermoe.pipeline.extend:run_extend",
     "Open the next generation: profile, allocate and expand again; earlier experts stay frozen.",
     "Example: layermoe extend --new bn,hi,ne --budget 72"),
    ("status", step_options.StatusOptions, "layermoe.pipeline.status:show_status",
     "Show the lineage: base model, generations, each step's state, parameter counts.",
     "Example: layermoe status --json | jq .generations[1].allocation"),
    ("env", step_options.EnvOptions, "layermoe.pipeline.env:show_env",
     "The versions of layermoe, Python, torch (CUDA, GPUs) and the libraries, each marked inside or outside the tested range.",
     "Example: layermoe env   (paste it into a bug report; --json for tools)"),
    ("run", step_options.RunOptions, "layermoe.pipeline.recipe:run_recipe",
     "Run or resume every step of a recipe through the same manifest.",
     "Example: layermoe run qwen1.5-1.8b   (a shipped recipe by name; or a path: layermoe run my-recipe.yaml)"),
    ("recipes", step_options.RecipesOptions, "layermoe.pipeline.recipes:show_recipes",
     "List the shipped recipes, accelerate configs and lm-eval task folder; with a NAME, print its path.",
     "Example: accelerate launch --config_file $(layermoe recipes fsdp2) -m layermoe train --stage 1"),
    ("compare", step_options.CompareOptions, "layermoe.pipeline.compare.run:run_compare_recipe",
     "LayerMoE vs NeuronMoE vs MoE-LPR vs a dense fine-tune on one generation: same data, steps and tokens.",
     "Example: layermoe -w runs/cmp compare --budgets 36,54,72   (the demo model; or give a recipe)"),
    ("demo", step_options.DemoOptions, "layermoe.pipeline.recipe:run_demo",
     "The whole chain on the embedded model and corpus, offline.",
     "Example: layermoe demo -w /tmp/demo"),
]
for _command in COMMANDS:
    command(*_command)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
