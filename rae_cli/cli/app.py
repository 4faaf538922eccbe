"""The typer application object shared by all command modules."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rae",
    help="Diffusion Transformers with Representation Autoencoders (arXiv 2510.11690): train, sample, evaluate.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from rae_cli import __version__

        typer.echo(__version__)
        raise typer.Exit()
