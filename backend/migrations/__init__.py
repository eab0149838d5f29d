"""Alembic migrations of the backend's schema (backend.db.migrate runs them; see backend/alembic.ini)."""
