"""`specctl profiles list|show NAME`: the profiles that ship in profiles/."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from specctl.commands.common import console, handle_errors
from specctl.core.profile import find_profile, profiles_dir, read_toml, shipped_profiles

app = typer.Typer(help="List and print the profiles that ship with specctl.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_profiles() -> None:
    """List shipped profiles with their descriptions."""
    table = Table("profile", "description", title=f"profiles in {profiles_dir()}")
    for name in shipped_profiles():
        table.add_row(name, escape(str(read_toml(find_profile(name)).get("description", ""))))  # text, not markup
    console.print(table)


@app.command("show")
@handle_errors
def show(
    name: str,
    as_written: bool = typer.Option(False, "--as-written", help="Print the file's own lines instead of every key."),
) -> None:
    """Print a profile with every key resolved (extends and defaults applied), or its file as written."""
    if as_written:
        console.print(find_profile(name).read_text(encoding="utf-8"), markup=False, highlight=False)
        return
    from specctl.backends import load_profile
    from specctl.core.rundir import profile_to_toml

    console.print(profile_to_toml(load_profile(name)), markup=False, highlight=False)
