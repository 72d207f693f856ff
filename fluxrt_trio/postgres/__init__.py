"""Everything that talks to PostgreSQL. The only package that knows asyncio: asyncpg runs on it, and trio-asyncio
carries each unit of work across in one crossing. What comes out is plain data."""
