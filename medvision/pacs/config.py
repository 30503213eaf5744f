"""The bridge's settings file (YAML, validated like pipeline files)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medvision.config import read_yaml
from medvision.errors import ConfigError

__all__ = ["BridgeConfig", "DicomWebEndpoint", "FhirServer", "Peer", "PeerTLS", "Route",
           "StowListener",
           "StowSender", "WatchSource", "load_bridge_config"]

#: Names the bridge uses for its own inputs and outputs (a watched source may not take them).
DIMSE_SOURCE, STOW_SOURCE, DESTINATION, FHIR_DESTINATION = "dimse", "stow", "destination", "fhir"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerTLS(_Strict):
    """DICOM TLS towards a peer (PS3.15 B.9): the CA that signed its certificate, our client
    certificate and key when it asks for one, and whether its name must match."""

    ca: Path = Field(description="CA certificates (PEM) that verify the peer's certificate")
    certificate: Path | None = Field(default=None, description="our client certificate (PEM)")
    key: Path | None = Field(default=None, description="its private key (PEM)")
    check_hostname: bool = Field(default=True, description="the peer's certificate must name "
                                 "`server_name` (default: `host`)")
    server_name: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> PeerTLS:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("give both certificate and key, or neither")
        return self


class Peer(_Strict):
    """A DICOM node: AE title, host and port."""

    ae_title: str = Field(max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: PeerTLS | None = Field(default=None, description="DICOM TLS to this peer")
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


class HttpAuth(_Strict):
    """HTTP credentials, read from the environment (never written in the settings file)."""

    username: str | None = Field(default=None, description="HTTP basic user name")
    password_env: str | None = Field(
        default=None, description="environment variable holding the basic-auth password")
    token_env: str | None = Field(
        default=None, description="environment variable holding a bearer token")
    ca_bundle: Path | None = Field(
        default=None, description="CA certificates (PEM) to verify the server's TLS "
                                  "certificate; default: the system's")
    timeout_s: float = Field(default=60.0, gt=0, description="per HTTP request")
    client_certificate: Path | None = Field(
        default=None, description="client certificate (PEM) for servers that require one "
                                  "(mutual TLS)")
    client_key: Path | None = Field(default=None, description="its private key (PEM)")

    @model_validator(mode="after")
    def _one_scheme(self) -> HttpAuth:
        if self.token_env and (self.username or self.password_env):
            raise ValueError("give either a bearer token (token_env) or basic auth "
                             "(username, password_env), not both")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("basic auth needs both username and password_env")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("give both client_certificate and client_key, or neither")
        return self

    def secret(self, variable: str | None) -> str | None:
        """The value of the named environment variable.

        Raises:
            ConfigError: the variable is named but not set.
        """
        if variable is None:
            return None
        value = os.environ.get(variable)
        if not value:
            raise ConfigError(f"environment variable {variable} (a credential named in the "
                              "bridge settings) is not set")
        return value


class DicomWebEndpoint(HttpAuth):
    """A DICOMweb service root (QIDO-RS, WADO-RS and STOW-RS under one URL)."""

    url: str = Field(pattern=r"^https?://", description="service root, e.g. "
                     "http://127.0.0.1:8042/dicom-web/")


class WatchSource(_Strict):
    """A DICOMweb server the bridge polls (``pacs watch``) for studies to analyse."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="used in logs, the job "
                      "database and `pacs status`")
    dicomweb: DicomWebEndpoint
    poll_interval_s: float = Field(default=30.0, gt=0, description="seconds between QIDO-RS "
                                   "searches")
    study_date_within_days: int | None = Field(
        default=None, ge=0, description="search only studies whose StudyDate is this recent "
        "(keeps each poll small on a large archive; a study stored later with an older date "
        "is then not seen); default: every study")
    page_size: int = Field(default=200, ge=1, le=10000, description="QIDO-RS limit per request")
    results: Literal["source", "destination"] = Field(
        default="source", description="send results back to this server (STOW-RS into the "
                                      "source study) or to `destination`")


class StowSender(_Strict):
    """A system allowed to send by STOW-RS, with its bearer token."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    token_env: str | None = Field(default=None,
                                  description="environment variable holding its token")
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                     description="SHA-256 (hex) of its token")

    @model_validator(mode="after")
    def _one_token(self) -> StowSender:
        if (self.token_env is None) == (self.token_sha256 is None):
            raise ValueError(f"sender {self.name}: give exactly one of token_env, token_sha256")
        return self


class StowListener(_Strict):
    """The bridge's STOW-RS endpoint (``POST /studies``)."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    senders: tuple[StowSender, ...] = Field(min_length=1, description="who may send, each "
                                            "with its own token")
    tls: TLSConfig | None = None
    max_request_mb: float = Field(default=2048.0, gt=0, description="larger requests get 413")


class FhirServer(HttpAuth):
    """Where each analysed study's FHIR Bundle goes (as a transaction: PUT by id, so a resend
    never duplicates)."""

    url: str = Field(pattern=r"^https?://", description="FHIR base URL")


class FhirConfig(_Strict):
    """FHIR R4 output: ``fhir.json`` next to each report.json, optionally sent to a server."""

    server: FhirServer | None = None


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
    host: str = Field(default="127.0.0.1", description="address the DIMSE listener binds: "
                      "loopback by default; 0.0.0.0 listens on every interface")
    port: int | None = Field(default=11112, ge=1, le=65535,
                             description="DIMSE listener port; null: no DIMSE listener")
    allowed_calling_aes: tuple[str, ...] = Field(
        default=(), description="calling AE titles accepted; empty: any (a warning at start)")
    allowed_peer_networks: tuple[str, ...] = Field(
        default=(), description="peer addresses (CIDR, e.g. 10.1.0.0/16) whose DIMSE "
                                "connections are accepted; empty: any")
    tls: TLSConfig | None = None
    quiet_period_s: float = Field(default=10.0, ge=0,
                                  description="a study is complete after this long without news")
    destination: Peer | DicomWebEndpoint | None = Field(
        default=None, description="where results of DIMSE and STOW-RS input go (a DIMSE peer, "
        "or a DICOMweb root for STOW-RS); watched sources send back to themselves by default")
    sources: tuple[WatchSource, ...] = Field(default=(), description="DICOMweb servers to "
                                             "poll (`pacs watch`)")
    stow: StowListener | None = None
    fhir: FhirConfig | None = None
    routes: tuple[Route, ...] = Field(min_length=1)
    retry: RetryConfig = RetryConfig()
    poll_interval_s: float = Field(default=0.5, gt=0)
    workers: int = Field(default=2, ge=1, le=16,
                         description="studies analysed at once (each worker loads its own "
                                     "models)")
    device: str = Field(default="auto", description="where the models run: auto (a GPU when "
                        "PyTorch sees one), cpu, cuda, cuda:N or mps; checked at start (exit 2 "
                        "when it is not there)")
    audit_log: Path | None = Field(default=None, description="default: WORKDIR/audit.sqlite")

    @model_validator(mode="after")
    def _networks_are_cidr(self) -> BridgeConfig:
        import ipaddress

        for network in self.allowed_peer_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise ValueError(f"allowed_peer_networks: {e}") from e
        return self

    @model_validator(mode="after")
    def _results_have_somewhere_to_go(self) -> BridgeConfig:
        names = [s.name for s in self.sources]
        taken = {DIMSE_SOURCE, STOW_SOURCE, DESTINATION, FHIR_DESTINATION}
        for name in names:
            if name in taken or names.count(name) > 1:
                raise ValueError(f"source name {name!r} is reserved or used twice")
        if self.destination is None:
            if self.port is not None:
                raise ValueError("a DIMSE listener (port) needs a destination for its results "
                                 "(or set port: null)")
            if self.stow is not None:
                raise ValueError("a STOW-RS listener needs a destination for its results")
            if any(s.results == "destination" for s in self.sources):
                raise ValueError("a source sends results to `destination`, which is not set")
        if self.port is None and self.stow is None and not self.sources:
            raise ValueError("nothing to receive from: no port, no stow, no sources")
        return self

    def destination_for(self, source: str) -> str:
        """The name of the destination for results of a study from ``source``."""
        for watched in self.sources:
            if watched.name == source and watched.results == "source":
                return watched.name
        return DESTINATION

    def endpoint(self, name: str) -> Peer | DicomWebEndpoint | FhirServer | None:
        """A destination by name (``None``: not configured, e.g. removed since queued)."""
        if name == DESTINATION:
            return self.destination
        if name == FHIR_DESTINATION:
            return self.fhir.server if self.fhir else None
        for watched in self.sources:
            if watched.name == name:
                return watched.dicomweb
        return None


def load_bridge_config(path: str | os.PathLike[str]) -> BridgeConfig:
    """Read and validate a bridge settings file.

    Raises:
        ConfigError: missing, unreadable or invalid; the message names the file.
    """
    file = Path(path)
    raw = read_yaml(file)
    try:
        return BridgeConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{file}: invalid bridge settings: {problems}") from e
