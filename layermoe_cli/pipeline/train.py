"""`layermoe train --stage 1|2`."""

from layermoe_cli.errors import LayermoeError


def run_train(workdir, **options):
    raise LayermoeError("`layermoe train` is not built yet in this version (training lands with issue 5)")
