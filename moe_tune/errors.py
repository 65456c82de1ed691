"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""

from pathlib import Path


class MoeTuneError(Exception):
    """A problem with the user's input (recipe, data, model, command line), stated so they can fix it."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was kept and how to go on."""


def shown(path) -> str:
    """A path as an error names it. Relative paths are read from the working directory, as TRL
    and axolotl read them; a relative one is named with the folder it was read from."""
    return str(path) if Path(path).is_absolute() else f"{path} (read from {Path.cwd()})"
