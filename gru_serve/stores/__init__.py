"""Session stores: the record and interface, in memory, Redis, SQLite."""
