"""`layermoe run RECIPE` and `layermoe demo`."""

from layermoe_cli.errors import LayermoeError


def run_recipe(workdir, recipe):
    raise LayermoeError("`layermoe run` is not built yet in this version (recipes land with issue 7)")


def run_demo(workdir, compare=False):
    raise LayermoeError("`layermoe demo` is not built yet in this version (the demo chain lands with issue 7)")
