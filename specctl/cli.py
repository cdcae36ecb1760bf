"""The specctl command line. Each subcommand lives in specctl/commands/<name>.py."""

from __future__ import annotations

import typer

from specctl import __version__
from specctl.commands import profiles
from specctl.commands.analyze import analyze
from specctl.commands.distill import distill
from specctl.commands.finetune_head import finetune_head
from specctl.commands.plot import plot
from specctl.commands.pretrain import pretrain
from specctl.commands.spec_test import spec_test
from specctl.commands.sweep import sweep

app = typer.Typer(
    name="specctl",
    help="Speculative decoding for time-series foundation models and early-exit LLMs: train drafts, "
    "run speculative decoders, and measure how much faster and how much worse.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def version(value: bool) -> None:
    if value:
        print(f"specctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(_version: bool = typer.Option(False, "--version", callback=version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Speculative decoding for time-series foundation models and early-exit LLMs."""


app.add_typer(profiles.app, name="profiles")
app.command("pretrain")(pretrain)
app.command("distill")(distill)
app.command("finetune-head")(finetune_head)
app.command("spec-test")(spec_test)
app.command("sweep")(sweep)
app.command("analyze")(analyze)
app.command("plot")(plot)
