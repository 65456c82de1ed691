"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""


class MoeTuneError(Exception):
    """A problem with the user's input (recipe, data, model, command line), stated so they can fix it."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was kept and how to go on."""
