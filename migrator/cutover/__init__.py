"""The application's switch from Redis to PostgreSQL: the dual-write service, shadow-read parity,
health and the cutover itself."""
