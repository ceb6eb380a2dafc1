"""`layermoe extend`: open the next generation (lifelong expansion)."""

from layermoe_cli.errors import LayermoeError


def run_extend(workdir, **options):
    raise LayermoeError("`layermoe extend` is not built yet in this version (lifelong expansion lands with issue 7)")
