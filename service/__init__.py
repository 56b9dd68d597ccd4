"""The GID REST service: FastAPI + SQLAlchemy over the ``gid_core`` engine.

``service.main.create_app()`` builds the application; ``service.crud`` holds every database
operation (the worker calls the job-lease functions there); ``service.storage`` owns the files under
``settings.data_dir``.
"""
