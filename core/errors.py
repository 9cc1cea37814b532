"""The one exception type that the CLI turns into a single error line."""


class MlakitError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it cleans up as Ctrl-C does."""
