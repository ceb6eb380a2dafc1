"""Step options: each field written once, with its default, its help text and its command-line flag.

Every pipeline step takes one pydantic model of this kind (`pipeline/options.py`). The same
model builds the step's command-line options (`cli.py` reads `flags`, `help` and the default of
each field), validates the step's section of a recipe (typed: an unknown key is one line naming
it and the known ones), and is what the step function receives. Torch-free, so the CLI can
import it to draw `--help` without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from layermoe.core.errors import LayermoeError


def option(default: Any = ..., *flags: str, help: str = "", cli: bool = True, **constraints: Any) -> Any:
    """A field of a step's options: its default, its flags (e.g. "--model", "-m"; default: the
    field's name with dashes) and its help text. `cli=False`: settable in recipes only.
    `constraints` are pydantic's (gt, ge, ...) or, under `typer`, extra typer.Option settings."""
    typer_settings = constraints.pop("typer", {})
    extra = {"flags": list(flags), "cli": cli, "typer": typer_settings}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def split_commas(value: Any) -> Any:
    """`"en, zh,es"` -> `["en", "zh", "es"]`; a list stays a list; None stays None."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A language list or a task list: a comma-separated string on the command line, a list in a recipe.
CommaList = Annotated[list[str], BeforeValidator(split_commas)]
OptionalCommaList = Annotated[list[str] | None, BeforeValidator(split_commas)]


@dataclass(frozen=True)
class FlagsFrom:
    """Metadata of a field holding another model's settings: its command-line flags are those of
    `model`'s fields (`only`: a subset; a dotted name reaches into a nested model). On a `dict`
    field, the dict holds the settings given on the command line (they override a recipe's)."""

    model: type
    only: tuple[str, ...] | None = None


def join_numbers(value: Any) -> Any:
    """A YAML list of layer numbers or counts -> "5,4,3", the form the command line gives (a file path stays)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


# Per-layer numbers: "5,4,3" (or a file of them) on the command line, a list in a recipe.
NumberList = Annotated[str | None, BeforeValidator(join_numbers)]


def first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted location, message) of a pydantic error's first problem."""
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


class StepOptions(BaseModel):
    """Base of every step's options: unknown names are refused (a typo must not train with a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields a recipe may not set in this step's section: the recipe runner sets them itself.
    recipe_excluded: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def recipe_fields(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in cls.recipe_excluded]

    @classmethod
    def from_section(cls, section: dict | None, where: str, **set_by_runner: Any):
        """The options of a recipe's section `where` (e.g. "generations.0.profile"), plus what the runner sets."""
        section = dict(section or {})
        allowed = cls.recipe_fields()
        unknown = sorted(set(section) - set(allowed))
        if unknown:
            raise LayermoeError(f"`{where}` has no option {unknown[0]!r} (it takes {', '.join(sorted(allowed))})")
        try:
            return cls(**section, **set_by_runner)
        except ValidationError as err:
            location, message = first_error(err)
            raise LayermoeError(f"`{where}.{location}`: {message}") from None

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (on the command line or in a recipe), not left at their defaults."""
        return {name: getattr(self, name) for name in self.model_fields_set}


def flags_from(field) -> FlagsFrom | None:
    return next((m for m in field.metadata if isinstance(m, FlagsFrom)), None)


def is_comma_list(field) -> bool:
    return any(getattr(m, "func", None) is split_commas for m in field.metadata)


def flags_of(name: str, field) -> list[str]:
    """The command-line flags of a field: as declared, else `--field-name`."""
    extra = field.json_schema_extra or {}
    return list(extra.get("flags") or [f"--{name.replace('_', '-')}"])


def on_cli(field) -> bool:
    """Only fields declared with `option()` (and not cli=False) are command-line flags."""
    return bool((field.json_schema_extra or {}).get("cli", False))
