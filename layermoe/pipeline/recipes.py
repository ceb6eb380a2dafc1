"""Recipes: a lineage (base model, one entry per generation) in one YAML file, typed.

Each generation's step sections are the options models of those steps (`pipeline/options.py`):
`profile:` is a `ProfileOptions`, `allocate:` an `AllocateOptions`, `expand:` an `ExpandOptions`,
`stage1:`/`stage2:` a `TrainConfig`, `eval:` an `EvalOptions`. An unknown key is one line naming
it and the keys the section takes. The shipped recipes and accelerate configs are package data,
found by name (`layermoe run demo`) as well as by path; so is an example folder of lm-eval tasks
(`eval --tasks layermoe_tiny_mc --tasks-path $(layermoe recipes lm-eval-tasks)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.table import Table

from layermoe.core.console import console
from layermoe.core.errors import LayermoeError
from layermoe.core.options import first_error
from layermoe.pipeline.options import AllocateOptions, EvalOptions, ExpandOptions, ProfileOptions, RecipesOptions
from layermoe.training.config import TrainConfig, load_train_config

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data: layermoe/recipes/
ACCELERATE_DIR = RECIPES_DIR / "accelerate"
LM_EVAL_TASKS_DIR = RECIPES_DIR / "lm-eval-tasks"  # a local lm-eval task (YAML, loader, data): `eval --tasks-path`
TASK_FOLDERS = {"lm-eval-tasks": LM_EVAL_TASKS_DIR}


class GenerationRecipe(BaseModel):
    """One generation of a recipe. The first one also names the base model's languages (`old`)."""

    model_config = ConfigDict(extra="forbid")

    old: list[str] | None = None  # the first generation only: the base model's languages (G0)
    new: list[str]
    data: dict[str, str] = Field(default_factory=dict)
    profile: ProfileOptions = Field(default_factory=ProfileOptions)
    allocate: AllocateOptions = Field(default_factory=AllocateOptions)
    expand: ExpandOptions = Field(default_factory=ExpandOptions)
    stage1: TrainConfig | None = Field(default_factory=lambda: TrainConfig(stage=1))  # null skips the stage
    stage2: TrainConfig | None = Field(default_factory=lambda: TrainConfig(stage=2))
    eval: EvalOptions | None = Field(default_factory=EvalOptions)

    @model_validator(mode="before")
    @classmethod
    def _stage_numbers(cls, values: Any) -> Any:
        """A stage section is a TrainConfig of that stage: its number comes from the key."""
        if isinstance(values, dict):
            values = dict(values)
            for stage in (1, 2):
                section = values.get(f"stage{stage}")
                if isinstance(section, dict):
                    values[f"stage{stage}"] = {**section, "stage": stage}
        return values

    def data_args(self) -> list[str]:
        """The `data:` mapping as `--data LANG=SPEC` values."""
        return [f"{lang}={source}" for lang, source in self.data.items()]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "recipe"
    model: str
    device: str = "auto"
    generations: list[GenerationRecipe]
    compare: dict[str, Any] | None = None  # LayerMoE vs NeuronMoE vs MoE-LPR vs dense (pipeline/compare)


# The options model of each step section, to name what a section may hold.
SECTIONS = {"profile": ProfileOptions, "allocate": AllocateOptions, "expand": ExpandOptions, "eval": EvalOptions}


def shipped(kind: str = "recipe") -> dict[str, Path]:
    """The shipped recipes (`kind="recipe"`: `demo`, ..., `paper/qwen1.5-1.8b-g1`, ...) or accelerate
    configs (`"accelerate"`), by name."""
    if kind != "recipe":
        return {path.stem: path for path in sorted(ACCELERATE_DIR.glob("*.yaml"))}
    found = {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}
    found.update({f"paper/{path.stem}": path for path in sorted((RECIPES_DIR / "paper").glob("*.yaml"))})
    return found


def find_recipe(spec: str | Path, kind: str = "recipe") -> Path:
    """A recipe (or accelerate config) by path, or by the name of a shipped one (`demo`, `qwen1.5-1.8b`)."""
    path = Path(spec)
    if path.is_file():
        return path
    known = shipped(kind)
    if str(spec) in known:
        return known[str(spec)]
    what = "recipe" if kind == "recipe" else "accelerate config"
    if path.suffix in (".yaml", ".yml") or "/" in str(spec):
        raise LayermoeError(f"{what} not found: {spec} (the shipped ones: {', '.join(known)})")
    raise LayermoeError(f"no shipped {what} named {spec!r}: use one of {', '.join(known)} or give a YAML file")


def _check_sections(path: Path, data: dict) -> None:
    """Every key of every step section names a real option of that step: checked before anything runs."""
    for number, spec in enumerate(data.get("generations") or []):
        if not isinstance(spec, dict):
            continue
        for name, model in SECTIONS.items():
            section = spec.get(name)
            if isinstance(section, dict):
                allowed = model.recipe_fields()
                unknown = sorted(set(section) - set(allowed))
                if unknown:
                    raise LayermoeError(f"recipe {path}: `generations.{number}.{name}` has no option {unknown[0]!r} "
                                        f"(it takes {', '.join(sorted(allowed))})")
        for stage in (1, 2):
            section = spec.get(f"stage{stage}")
            if isinstance(section, dict):
                try:
                    load_train_config(None, **{**section, "stage": stage})
                except LayermoeError as e:
                    raise LayermoeError(f"recipe {path}: `generations.{number}.stage{stage}`: {e}") from None


def load_recipe(spec: str | Path) -> Recipe:
    path = find_recipe(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LayermoeError(f"recipe {path} is not a text file (byte {e.start:,} is not UTF-8): pass a YAML file") from None
    except yaml.YAMLError as e:
        raise LayermoeError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise LayermoeError(f"recipe {path} is empty: see `layermoe recipes` for recipes to start from")
    if isinstance(data, dict):
        _check_sections(path, data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        where, message = first_error(e)
        raise LayermoeError(f"recipe {path}: `{where}`: {message}") from None
    if not recipe.generations or not recipe.generations[0].old:
        raise LayermoeError(f"recipe {path}: the first generation needs `old:` (the base model's languages)")
    return recipe


def show_recipes(workdir, options: RecipesOptions) -> None:
    """`layermoe recipes`: the shipped recipes, accelerate configs and lm-eval task folder; with a NAME,
    that one's path alone."""
    recipes, configs = shipped("recipe"), shipped("accelerate")
    if options.name:
        path = recipes.get(options.name) or configs.get(options.name) or TASK_FOLDERS.get(options.name)
        if path is None:
            raise LayermoeError(f"no shipped recipe, accelerate config or task folder named {options.name!r}: use one of "
                                f"{', '.join([*recipes, *configs, *TASK_FOLDERS])}")
        print(path)  # plain, for $(layermoe recipes fsdp2)
        return
    table = Table(title="shipped with layermoe", title_justify="left")
    for column in ("name", "kind", "path"):
        table.add_column(column, overflow="fold")
    for kind, found in (("recipe (layermoe run NAME)", recipes), ("accelerate config", configs),
                        ("lm-eval task folder (eval --tasks-path)", TASK_FOLDERS)):
        for name, path in found.items():
            table.add_row(name, kind, str(path))
    console.print(table)
