"""Generate the checked-in shell completion scripts from the click app.

`python -m modelctl.completions completions` (what `make completions` runs) writes
completions/modelctl.{bash,zsh,fish}; `--check` only says whether they are stale. The
scripts are click's own: at completion time they run `modelctl` with `_MODELCTL_COMPLETE`
set, so options and model ids (from the daemon's `/models`) come from the app itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from modelctl.cli import COMPLETE_VAR, PROG_NAME, cli

SHELLS: dict[str, str] = {"bash": "bash", "zsh": "zsh", "fish": "fish"}  # shell -> file suffix


def render_scripts() -> dict[str, str]:
    """File name -> script text, for every supported shell."""
    scripts: dict[str, str] = {}
    for shell, suffix in SHELLS.items():
        cls = get_completion_class(shell)
        if cls is None:
            raise RuntimeError(f"click has no {shell} completion")
        completer = cls(cli, {}, PROG_NAME, COMPLETE_VAR)
        # source_template % source_vars() is what .source() returns, minus the bash version
        # probe that .source() runs: generation must not depend on the machine's bash.
        text = cls.source_template % completer.source_vars()
        scripts[f"{PROG_NAME}.{suffix}"] = text.rstrip("\n") + "\n"
    return scripts


def stale_files(directory: Path) -> list[str]:
    """Names of the scripts in `directory` that are missing or differ from a fresh render."""
    stale = []
    for name, text in render_scripts().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Only check: exit 1 when a script is stale.")
def generate(directory: Path, check: bool) -> None:
    """Write (or with --check, verify) the completion scripts in DIRECTORY."""
    if check:
        stale = stale_files(directory)
        for name in stale:
            click.echo(f"stale: {directory / name} (run `make completions`)", err=True)
        sys.exit(1 if stale else 0)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render_scripts().items():
        (directory / name).write_text(text, encoding="utf-8")
        click.echo(f"wrote {directory / name}")


if __name__ == "__main__":
    generate()
