"""Persistence: SQLAlchemy 2 models, engine/session setup and Alembic migrations.

SQLite is the embedded default, PostgreSQL the scale-out database; both run the same migrations.
No business rules live here: services decide, storage stores.
"""
