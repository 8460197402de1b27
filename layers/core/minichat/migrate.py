"""Ordered SQL migrations: each applied once, in a transaction, under an advisory lock."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = ["apply_migrations", "ensure_database", "migrations_dir"]

# Any constant both migrating processes agree on; the second waits for the first.
_LOCK_KEY = 0x4D696E6943686174  # "MiniChat"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations_dir() -> Path:
    """`MINICHAT_MIGRATIONS_DIR`, else the packaged copy (layer), else the repository's infra/migrations."""
    env = os.environ.get("MINICHAT_MIGRATIONS_DIR")
    if env:
        return Path(env)
    packaged = Path(__file__).with_name("migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "infra" / "migrations"


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist; True when it was created."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    name = str(info.get("dbname") or "")
    if not name:
        raise ValueError("DATABASE_URL names no database")
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False
    return True


def apply_migrations(database_url: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations in order; returns the versions applied by this call."""
    directory = directory or migrations_dir()
    files = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    applied_now: list[str] = []
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for path in files:
                version = path.name[:4]
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name)
                    )
                applied_now.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def main() -> None:
    """`python -m minichat.migrate`: create the database if needed and apply migrations."""
    from minichat.config import get_settings

    url = get_settings().database_url
    ensure_database(url)
    for name in apply_migrations(url):
        print(f"applied {name}")


if __name__ == "__main__":
    main()
