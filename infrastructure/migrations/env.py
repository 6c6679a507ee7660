"""Alembic's environment: migrations run on the connection `infrastructure.database` hands in.

Run from the command line (`alembic -c ...` is not needed): `python -m scripts.db upgrade` applies them to
DATABASE_URL the same way the server does at start-up.
"""

from __future__ import annotations

from alembic import context

from infrastructure.tables import Base

target_metadata = Base.metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through infrastructure.database.Database.migrate (python -m scripts.db upgrade)")

context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
