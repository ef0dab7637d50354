"""Where evalrun keeps things. Every location can be moved by an environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from runner.errors import InputError


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    if not value:
        return default
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:  # ``~user/…`` for a user this system does not have
        raise InputError(
            f"${var} cannot be used: {exc}",
            variable=var,
            expected="a path (~ for your own home, ~USER for an existing user's)",
            found=value,
        ) from None


@dataclass(frozen=True)
class Settings:
    """Paths and defaults, resolved once from the environment."""

    home: Path = field(
        default_factory=lambda: _env_path(
            "EVALRUN_HOME", Path(platformdirs.user_data_dir("evalrun"))
        )
    )
    """Store of bundles, run index, default keys and logs (``$EVALRUN_HOME``)."""

    cache: Path = field(
        default_factory=lambda: _env_path(
            "EVALRUN_CACHE", Path(platformdirs.user_cache_dir("evalrun"))
        )
    )
    """Wheels, base-image tarballs and inputs, keyed by content; shared by every checkout."""

    registry: str = field(
        default_factory=lambda: os.environ.get("EVALRUN_REGISTRY", "127.0.0.1:5000")
    )
    """The embedded default registry."""

    @property
    def default_private_key(self) -> Path:
        return self.home / "keys" / "evalrun.key"

    @property
    def default_public_key(self) -> Path:
        return self.home / "keys" / "evalrun.pub"

    @property
    def input_cache(self) -> Path:
        """The content-addressed cache of model and dataset inputs (``$EVALRUN_CACHE/inputs``)."""
        return self.cache / "inputs"

    @property
    def wheel_cache(self) -> Path:
        return self.cache / "wheels"

    @property
    def base_cache(self) -> Path:
        return self.cache / "base"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "evalrun.jsonl"
