"""Test configurations and the tokens that go with them."""

from __future__ import annotations

from typing import Any

from fluxrt_trio.auth import mint
from fluxrt_trio.config import (
    ApiConfig,
    AuthConfig,
    ClusterConfig,
    Config,
    DatabaseConfig,
    LogConfig,
    RealtimeConfig,
    ServerConfig,
)

SECRET = "test-secret-" + "x" * 64


def make_config(**sections: dict[str, Any]) -> Config:
    """A test configuration: 127.0.0.1, port 0, an HS256 secret; keyword arguments override sections."""
    server = {"host": "127.0.0.1", "port": 0, **sections.pop("server", {})}
    auth = {"jwt_secret": SECRET, **sections.pop("auth", {})}
    parts = {
        "server": ServerConfig(**server),
        "auth": AuthConfig(**auth),
        "database": DatabaseConfig(**sections.pop("database", {})),
        "realtime": RealtimeConfig(**sections.pop("realtime", {})),
        "cluster": ClusterConfig(**sections.pop("cluster", {})),
        "api": ApiConfig(**sections.pop("api", {})),
        "log": LogConfig(**sections.pop("log", {})),
    }
    assert not sections, f"unknown sections {sections}"
    return Config(**parts)


def token(sub: str = "alice", **kwargs: Any) -> str:
    """A token for `sub` signed with SECRET; keyword arguments as for `fluxrt_trio.auth.mint`."""
    return mint(SECRET, sub, **kwargs)
