"""HTTP interface (FastAPI): the only place errors become RFC 9457 problem documents."""
