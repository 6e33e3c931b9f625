"""The ``adapterswap`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad usage. Errors are one line on stderr;
``--debug`` shows the traceback. Paths that only list things never import torch.

The group is :func:`main`; the built-in commands live in the modules beside this one
(:mod:`~adapterswap.cli.info`: ``plugins``, ``list``, ``doctor``;
:mod:`~adapterswap.cli.generate`; :mod:`~adapterswap.cli.sweep`: ``sweep``, ``trajectory``,
``ablate``, ``swap``; :mod:`~adapterswap.cli.results`: ``report``, ``compare``, ``merge``;
:mod:`~adapterswap.cli.score`: ``score``).
Plugins add theirs through the ``register_commands`` hook (:mod:`adapterswap.cli.common`).
"""

from __future__ import annotations

import click

from adapterswap import __version__
from adapterswap.cli.common import AdapterswapGroup
from adapterswap.cli.common import (  # noqa: F401 - the helper's old import path
    parse_metric_options as _metric_options,
)
from adapterswap.cli.execution import confound_warnings, failure_reasons, time_accounting
from adapterswap.cli.generate import generate_command
from adapterswap.cli.info import doctor_command, list_command, plugins_command
from adapterswap.cli.results import compare_command, merge_command, report_command
from adapterswap.cli.score import score_command
from adapterswap.cli.sweep import ablate_command, swap_command, sweep_command, trajectory_command

__all__ = ["confound_warnings", "failure_reasons", "main", "run", "time_accounting"]


@click.group(cls=AdapterswapGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Examples:\n\n\b\n  adapterswap plugins\n  adapterswap list backbones\n"
                    "  adapterswap doctor")
@click.version_option(__version__, prog_name="adapterswap")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--verbose", is_flag=True,
              help="Let diffusers, transformers and huggingface_hub print their progress bars, "
                   "log messages and warnings (off by default).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Move adapters across diffusion backbones and measure how many steps they need."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not verbose:
        from adapterswap.quiet import silenced

        ctx.with_resource(silenced())


for _command in (plugins_command, list_command, doctor_command, generate_command,
                 sweep_command, trajectory_command, ablate_command, swap_command,
                 merge_command, compare_command, report_command, score_command):
    main.add_command(_command)
del _command


def run() -> None:
    """Console-script entry point (also ``python -m adapterswap``): the command, then, once
    torch was imported, an exit without the interpreter's seconds of teardown
    (:mod:`adapterswap.cli.fast_exit`)."""
    from adapterswap.cli.fast_exit import fast_exit, wanted

    try:
        main(prog_name="adapterswap")
    except SystemExit as exc:
        if not wanted():
            raise
        fast_exit(exc.code)
