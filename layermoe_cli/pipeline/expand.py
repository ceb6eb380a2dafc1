"""`layermoe expand`."""

from layermoe_cli.errors import LayermoeError


def run_expand(workdir, **options):
    raise LayermoeError("`layermoe expand` is not built yet in this version (expansion lands with issue 4)")
