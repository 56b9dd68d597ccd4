"""The GID REST service: FastAPI + SQLAlchemy over the ``gid_core`` engine.

``service.main.create_app()`` builds the application; ``service.crud`` holds the API's database
operations and ``service.leases`` the worker's (the job lease protocol); ``service.storage`` owns the
files under ``settings.data_dir``; ``service.core.config.Settings`` is the one settings object of
the API and the worker.
"""
