"""Deprecated: the import package is `layermoe` now. `import layermoe_cli` keeps working for one
release: it warns, registers the model as it used to, and `layermoe_cli.<module>` resolves to the
module's new home (e.g. `layermoe_cli.models` is `layermoe.modeling.base`)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

warnings.warn("`layermoe_cli` is now `layermoe`: import layermoe (the model classes: layermoe.modeling); "
              "the old name goes away in the next release", DeprecationWarning, stacklevel=2)

# Modules that moved into a package of their own; everything else kept its path under `layermoe`.
MOVED = {
    "errors": "core.errors", "console": "core.console", "progress": "core.progress", "manifest": "core.manifest",
    "workdir": "core.workdir", "integrity": "core.integrity", "languages": "data.languages",
    "hsa": "profiling.hsa", "similarity": "profiling.similarity", "neurons": "profiling.neurons",
    "expert_use": "profiling.expert_use", "plots": "profiling.plots", "allocation": "allocation.strategies",
    "models": "modeling.base", "generation": "modeling.generation", "report": "evaluation.report",
    "lm_eval_bridge": "evaluation.lm_eval",
}


def new_name(old: str) -> str:
    """`layermoe_cli.a.b` -> the module's name in `layermoe`."""
    rest = old.split(".", 1)[1]
    head, _, tail = rest.partition(".")
    moved = MOVED.get(rest) or (MOVED[head] + "." + tail if head in MOVED and tail else None)
    return "layermoe." + (moved or rest)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `layermoe_cli.X` as the already importable `layermoe` module it became."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module):
        pass  # the module ran when `layermoe` imported it


sys.meta_path.insert(0, _Alias())

import layermoe.modeling  # noqa: E402,F401  (registers the model, as `import layermoe_cli` did)
from layermoe import __version__  # noqa: E402,F401
