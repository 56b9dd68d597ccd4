"""The ``gid`` command: a typed HTTP client, the CLI commands, and the launchers that start the
service and workers.

``gid.client`` is the Python client of the REST API (``httpx`` only); ``gid.cli`` the commands;
``gid.embedded`` the one-machine stack of ``gid up``. This package sits above ``service`` and
``worker``: it starts both, and neither imports it.
"""
