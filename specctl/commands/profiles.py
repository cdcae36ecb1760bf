"""`specctl profiles list|show NAME`: the profiles that ship in profiles/."""

from __future__ import annotations

import typer
from rich.table import Table

from specctl.commands.common import console, handle_errors
from specctl.core.profile import find_profile, load_profile, profiles_dir, read_toml, shipped_profiles

app = typer.Typer(help="List and print the profiles that ship with specctl.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_profiles() -> None:
    """List shipped profiles with their descriptions."""
    table = Table("profile", "description", title=f"profiles in {profiles_dir()}")
    for name in shipped_profiles():
        table.add_row(name, str(read_toml(find_profile(name)).get("description", "")))
    console.print(table)


@app.command("show")
@handle_errors
def show(
    name: str, resolved: bool = typer.Option(False, "--resolved", help="Print with extends and defaults applied.")
) -> None:
    """Print a shipped profile (as written, or fully resolved)."""
    if resolved:
        from specctl.core.rundir import profile_to_toml

        console.print(profile_to_toml(load_profile(name)), markup=False, highlight=False)
    else:
        console.print(find_profile(name).read_text(encoding="utf-8"), markup=False, highlight=False)
