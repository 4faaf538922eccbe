"""Helpers every command uses: preset/override options, config resolution, ``--dry-run``, clear errors."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

# Context settings that let trailing ``key=value`` overrides through as plain arguments.
OVERRIDE_CONTEXT = {"allow_extra_args": False, "help_option_names": ["-h", "--help"]}


def overrides_argument() -> Any:
    return typer.Argument(None, help="Config overrides as key=value (e.g. train.lr=1e-4 rae=tiny).",
                          show_default=False, metavar="[KEY=VALUE]...")


def preset_option(default: Optional[str], kind: str) -> Any:
    return typer.Option(default, "--preset", "-p",
                        help=f"A shipped {kind} preset name (see `rae presets`) or a path to a YAML file.")


def dry_run_option() -> Any:
    return typer.Option(False, "--dry-run", help="Print the resolved config and exit.")


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors a user can act on (RaeError) into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rae_cli.errors import RaeError

        try:
            return fn(*args, **kwargs)
        except RaeError as e:
            fail(str(e))
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            # A disk that filled up or went read-only mid-run, a file without permission: one line, what to do.
            fail(f"{e.strerror}: {e.filename or 'a file'}. Finished work is kept; fix the location (free space, "
                 "permissions) and re-run the same command")
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command to resume.")
            raise typer.Exit(130)

    return wrapper


def resolve_config(cls: type, preset: Optional[str], overrides: Optional[List[str]], dry_run: bool,
                   base: Optional[dict] = None, plan=None):
    """Resolve a config; with ``--dry-run`` print it as YAML (and ``plan(cfg)``'s memory plan) and exit 0."""
    from rae_cli.config import resolve

    cfg = resolve(cls, preset=preset, overrides=list(overrides or []), base=base)
    if dry_run:
        print_dry_run(cfg, plan)
    return cfg


def check_out(path: Optional[Path], kind: str = "dir", what: str = "--out", required: bool = False) -> None:
    """Fail in one line, before any compute, unless ``path`` can be written (``kind``: dir or file).

    ``required``: the option may be left out only with ``--dry-run`` (which exits before this check)."""
    if path is None:
        if required:
            from rae_cli.config import ConfigError

            raise ConfigError(f"missing option {what}: where to write the results (only --dry-run runs without it)")
        return
    from rae_cli.output import check_output_dir, check_output_file

    (check_output_dir if kind == "dir" else check_output_file)(path, what)


def print_dry_run(cfg, plan=None) -> None:
    """The resolved config as YAML, then the memory plan as YAML comments (stdout stays valid YAML); exit 0."""
    from rae_cli.config import to_yaml

    sys.stdout.write(to_yaml(cfg))
    if plan is not None:
        try:
            lines = plan(cfg).lines()
        except Exception as e:  # the plan is advice: a config it cannot read still prints
            lines = [f"memory plan unavailable: {e}"]
        sys.stdout.write("".join(f"# {line}\n" for line in lines))
    raise typer.Exit(0)


def ensure_out_dir(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
