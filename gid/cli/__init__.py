"""The ``gid`` command (console entry point ``gid.cli:main``, and ``python -m gid``).

One module per concern; each command module has its ``cmd_*`` functions and an ``add_commands``
that declares their arguments:

``app``          the parser, global options (before or after the subcommand), exit codes, errors
``common``       ``CliError``/``fail``/``info``, the client options and ``client_of``, ``list``
``format``       text only: a job, progress display, tables, an experiment, commented YAML
``jobs``         submit, init, status, wait, logs, cancel, download, jobs list
``datasets``     datasets register | upload | list
``models``       models upload | list
``weights``      weights list | import
``experiments``  experiments create | show
``stack``        up, serve, worker, admin (these import the server's modules when they run)

Client commands import neither torch nor FastAPI, SQLAlchemy or Celery.
"""

from gid.cli.app import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]
