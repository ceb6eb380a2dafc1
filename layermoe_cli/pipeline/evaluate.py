"""`layermoe eval`."""

from layermoe_cli.errors import LayermoeError


def run_eval(workdir, **options):
    raise LayermoeError("`layermoe eval` is not built yet in this version (evaluation lands with issue 6)")
