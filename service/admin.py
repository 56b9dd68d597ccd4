"""Administration helpers for the ``gid admin`` CLI: owners and API tokens."""

from __future__ import annotations

from sqlalchemy.pool import NullPool

from service import crud
from service.core.config import Settings
from service.core.config import settings as default_settings
from service.core.db import make_engine, make_session_factory, session_scope
from service.migrate import upgrade_to_head


def create_token(owner_name: str, *, settings: Settings | None = None) -> str:
    """Create the owner if needed and a new API token for it; returns the plaintext token (shown
    once: only its keyed hash is stored)."""
    settings = settings or default_settings
    owner_name = owner_name.strip()
    if not 1 <= len(owner_name) <= 200:
        raise ValueError("owner name must be 1 to 200 characters")
    upgrade_to_head(settings.database_url)
    engine = make_engine(settings.database_url, poolclass=NullPool)
    try:
        with session_scope(make_session_factory(engine)) as session:
            owner = crud.get_or_create_owner(session, name=owner_name)
            return crud.create_token(session, owner_id=owner.id, secret=settings.secret_key)
    finally:
        engine.dispose()
