"""Administration helpers for the ``gid admin`` CLI: owners and API tokens."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from service import crud
from service.core.config import Settings
from service.core.config import settings as default_settings
from service.core.db import make_engine, make_session_factory, session_scope
from service.migrate import current_revision, upgrade_to_head


class DatabaseNotFound(LookupError):
    """The settings point at no initialised GID database (``database``: its URL, password hidden)."""

    def __init__(self, database: str) -> None:
        super().__init__(
            f"no GID database at {database}: run this where the service's settings point (GID_DATA_DIR / "
            "GID_DATABASE_URL, e.g. in the `gid up` data directory), or pass --init to create one"
        )
        self.database = database


def database_exists(url: str) -> bool:
    """True when ``url`` holds a migrated GID database (connecting to SQLite would create the file,
    so its file is looked for first)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        return False
    try:
        return current_revision(url) is not None
    except SQLAlchemyError:
        return False


def create_token(owner_name: str, *, settings: Settings | None = None, init: bool = False) -> str:
    """Create the owner if needed and a new API token for it; returns the plaintext token (shown
    once: only its keyed hash is stored). Raises ``DatabaseNotFound`` unless the database exists
    or ``init`` (then it is created and migrated): a token in a database no server reads is useless."""
    settings = settings or default_settings
    owner_name = owner_name.strip()
    if not 1 <= len(owner_name) <= 200:
        raise ValueError("owner name must be 1 to 200 characters")
    if not init and not database_exists(settings.database_url):
        raise DatabaseNotFound(make_url(settings.database_url).render_as_string(hide_password=True))
    upgrade_to_head(settings.database_url)
    engine = make_engine(settings.database_url, poolclass=NullPool)
    try:
        with session_scope(make_session_factory(engine)) as session:
            owner = crud.get_or_create_owner(session, name=owner_name)
            return crud.create_token(session, owner_id=owner.id, secret=settings.secret_key)
    finally:
        engine.dispose()
