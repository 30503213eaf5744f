"""The bridge's settings file (YAML, validated like pipeline files)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medvision.errors import ConfigError

__all__ = ["BridgeConfig", "Peer", "Route", "load_bridge_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Peer(_Strict):
    """A DICOM node: AE title, host and port."""

    ae_title: str = Field(max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    storage_commitment: bool = Field(
        default=False, description="ask the peer to confirm it keeps each result (DICOM "
                                   "Storage Commitment); a result counts only when confirmed")
    commitment_timeout_s: float = Field(
        default=300.0, gt=0, description="wait this long for the confirmation, then send again")


class Route(_Strict):
    """Studies whose series match go to ``pipeline`` (first matching route wins)."""

    pipeline: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    series_description: str | None = Field(default=None, description="regular expression")

    def matches(self, modality: str, body_part: str, description: str) -> bool:
        """Whether a series with these header values takes this route."""
        if self.modalities and modality.upper() not in {m.upper() for m in self.modalities}:
            return False
        if self.body_parts and body_part and body_part.upper() not in {
                b.upper() for b in self.body_parts}:
            return False
        if self.series_description and not re.search(self.series_description, description or "",
                                                     flags=re.I):
            return False
        return True


class TLSConfig(_Strict):
    """TLS for the listener: certificate and key, and a CA to require client certificates."""

    certificate: Path
    key: Path
    ca: Path | None = None


class RetryConfig(_Strict):
    """Retries: sending results (exponential backoff, capped, then ``failed``) and analyses
    that raised (a full disk, say)."""

    backoff_s: float = Field(default=2.0, gt=0)
    max_backoff_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=8, ge=1,
                              description="tries per result before it is marked failed")
    analysis_retry_s: float = Field(default=30.0, ge=0,
                                    description="wait before analysing again after an error")
    analysis_max_attempts: int = Field(default=3, ge=1,
                                       description="analyses of a study before it is failed")


class BridgeConfig(_Strict):
    """A whole bridge settings file."""

    ae_title: str = Field(default="MEDVISION", max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_calling_aes: tuple[str, ...] = Field(
        default=(), description="calling AE titles accepted; empty: any")
    tls: TLSConfig | None = None
    quiet_period_s: float = Field(default=10.0, ge=0,
                                  description="a study is complete after this long without news")
    destination: Peer
    routes: tuple[Route, ...] = Field(min_length=1)
    retry: RetryConfig = RetryConfig()
    poll_interval_s: float = Field(default=0.5, gt=0)
    workers: int = Field(default=2, ge=1, le=16,
                         description="studies analysed at once (each worker loads its own "
                                     "models)")
    audit_log: Path | None = Field(default=None, description="default: WORKDIR/audit.sqlite")


def load_bridge_config(path: str | os.PathLike[str]) -> BridgeConfig:
    """Read and validate a bridge settings file.

    Raises:
        ConfigError: missing, unreadable or invalid; the message names the file.
    """
    import yaml

    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: cannot read bridge settings ({e})") from e
    try:
        return BridgeConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{file}: invalid bridge settings: {problems}") from e
