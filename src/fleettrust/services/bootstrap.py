"""First-run set-up of a data directory: passphrase file, database schema, first admin token.

``fleettrust init`` and the quickstart call :func:`initialize`. The admin token is created only
when no admin token exists yet, and is returned once (only its hash is stored). This module never
creates or touches the offline root.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleettrust.clock import SystemClock
from fleettrust.config import Settings
from fleettrust.services import audit
from fleettrust.services.auth import SYSTEM, count_admins, create_token
from fleettrust.services.context import ensure_passphrase_file
from fleettrust.storage.db import make_engine, make_sessionmaker
from fleettrust.storage.migrate import upgrade


@dataclass(frozen=True)
class InitResult:
    admin_token: str | None


def initialize(settings: Settings, *, create_admin: bool = True) -> InitResult:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_passphrase_file(settings.data_dir)
    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)
        if not create_admin:
            return InitResult(admin_token=None)
        sessions = make_sessionmaker(engine)
        now = SystemClock().now()
        with sessions() as session, session.begin():
            if count_admins(session) > 0:
                return InitResult(admin_token=None)
            row, token = create_token(session, role="admin", subject="first-admin", now=now)
            session.flush()
            audit.record(session, SYSTEM, "token.create", "token", row.id, now,
                         role="admin", subject="first-admin", bootstrap=True)
            return InitResult(admin_token=token)
    finally:
        engine.dispose()
