"""HTTP peers of the bridge: DICOMweb servers (QIDO-RS, WADO-RS, STOW-RS through
``dicomweb-client``) and FHIR servers.

A :class:`Watcher` polls one DICOMweb source. Each poll searches studies (QIDO-RS, paged); a
study whose signature (instance count and modalities) differs from the one last retrieved and
has stayed the same for the quiet period is looked at series by series: series that match a
route, are not the bridge's own results and are new or grew are retrieved (WADO-RS) into the
same durable spool as DIMSE input, held out of the queue until the whole study is in, then
released and its signature recorded in one transaction. A restart therefore neither misses a
study (nothing was recorded before the retrieval finished) nor repeats one (the record and the
queueing are one commit); instances retrieved twice are stored once.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvision.errors import DeliveryError, InvalidDicomError, PacsError
from medvision.io.header_checks import check_uid
from medvision.pacs.receive import why
from medvision.pacs.urls import check_under

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

    from medvision.pacs.config import DicomWebEndpoint, FhirServer, Route, WatchSource
    from medvision.pacs.store import BridgeStore

__all__ = ["Watcher", "client_for", "fhir_deliver", "session_for", "stow_deliver"]

log = logging.getLogger(__name__)

#: Modalities of result objects (never analysed as input, whatever the routes say).
RESULT_MODALITIES = frozenset({"SR", "SEG", "KO", "PR", "REG", "RTSTRUCT"})
_STUDY_FIELDS = ("NumberOfStudyRelatedInstances", "ModalitiesInStudy")
_SERIES_FIELDS = ("Modality", "BodyPartExamined", "SeriesDescription",
                  "NumberOfSeriesRelatedInstances")


def session_for(auth: DicomWebEndpoint | FhirServer) -> requests.Session:
    """A ``requests`` session with the endpoint's credentials and CA bundle, that sends only
    to URLs under the endpoint's base URL (checked on every request and redirect before it
    leaves: see :mod:`medvision.pacs.urls`).

    Raises:
        ConfigError: a credential's environment variable is not set.
    """
    import requests

    ca_bundle = None if auth.ca_bundle is None else str(auth.ca_bundle)
    base = auth.url

    class Session(requests.Session):
        # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's own CA
        # bundle; the configured one must win.
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
            if ca_bundle is not None:
                settings["verify"] = ca_bundle
            return settings

        def send(self, request: Any, **kwargs: Any) -> Any:
            check_under(base, str(request.url))  # before the credentials go anywhere
            return super().send(request, **kwargs)

    session = Session()
    if auth.username:
        session.auth = (auth.username, auth.secret(auth.password_env) or "")
    token = auth.secret(auth.token_env)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    if ca_bundle is not None:
        session.verify = ca_bundle
    if auth.client_certificate is not None and auth.client_key is not None:
        session.cert = (str(auth.client_certificate), str(auth.client_key))
    return session


def client_for(endpoint: DicomWebEndpoint,
               session: requests.Session | None = None) -> DICOMwebClient:
    """A ``dicomweb-client`` for the endpoint (credentials, TLS, timeout)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(endpoint.url.rstrip("/"), session=session or session_for(endpoint),
                            timeout=endpoint.timeout_s)
    # Our own loop retries; the client's retries would hide an outage for minutes.
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or []
    return values[0] if len(values) == 1 else (values or None)


def _checked_uid(item: dict[str, Any], keyword: str, source: str) -> str | None:
    """A UID from a QIDO-RS answer, or ``None`` (logged) when it is absent or malformed."""
    try:
        return check_uid(_value(item, _tag(keyword)), keyword)
    except InvalidDicomError as e:
        log.warning("%s: skipped a QIDO-RS result: %s", source, e)
        return None


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def _http_error(where: str, error: Exception) -> PacsError:
    """Map a ``requests`` failure: an HTTP answer is a :class:`DeliveryError` (permanent for a
    refusal that resending cannot change), no answer a plain :class:`PacsError`."""
    import requests

    response = getattr(error, "response", None)
    if isinstance(error, requests.HTTPError) and response is not None:
        code = int(response.status_code)
        body = (response.text or "")[:300].replace("\n", " ")
        if code in (401, 403):
            return DeliveryError(f"{where}: HTTP {code}: the server refused our credentials "
                                 f"(check username/password_env or token_env) {body}")
        permanent = 400 <= code < 500 and code not in (408, 425, 429)
        return DeliveryError(f"{where}: HTTP {code} {body}", permanent=permanent)
    return PacsError(f"{where}: no answer ({type(error).__name__}: {error}); is the server "
                     "running and the URL right?")


def stow_deliver(endpoint: DicomWebEndpoint, path: Path) -> str | None:
    """STOW-RS one result file into its study. Returns a warning to keep, or ``None``.

    Raises:
        DeliveryError: the server answered with an error or listed the object as failed.
        PacsError: no answer (connection refused, timeout).
    """
    import pydicom
    import requests

    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError) as e:
        raise DeliveryError(f"{path}: cannot read the result for sending ({e})") from e
    where = f"STOW-RS to {endpoint.url}"
    try:
        study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    except InvalidDicomError as e:
        raise DeliveryError(f"{path}: not sent: {e}", permanent=True) from e
    session = session_for(endpoint)
    try:
        response = client_for(endpoint, session).store_instances([ds],
                                                                 study_instance_uid=study_uid)
    except requests.RequestException as e:
        raise _http_error(where, e) from e
    finally:
        session.close()
    failed = [item for item in response.get("FailedSOPSequence", [])
              if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid]
    if failed:
        reason = int(failed[0].get("FailureReason", 0x0110))
        raise DeliveryError(f"{where}: the server did not store the object (failure reason "
                            f"0x{reason:04X})", permanent=reason in (0x0122, 0xA900, 0xC000))
    stored = [item for item in response.get("ReferencedSOPSequence", [])
              if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid]
    if not stored:
        # not a delivery: the server may have dropped it; retried, then failed
        raise DeliveryError(f"{where}: the response did not list the object as stored")
    warning = stored[0].get("WarningReason")
    return None if warning is None else f"STOW-RS warning 0x{int(warning):04X}"


_FHIR_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
_FHIR_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def fhir_transaction(bundle: dict[str, Any]) -> dict[str, Any]:
    """A ``collection`` Bundle as a ``transaction`` that PUTs each resource by its id, so
    sending it again updates the same resources instead of adding copies."""
    entries = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind, rid = str(resource.get("resourceType", "")), str(resource.get("id", ""))
        # the request URL is resolved against the server's base: both parts must be plain
        if not _FHIR_TYPE.fullmatch(kind) or not _FHIR_ID.fullmatch(rid):
            raise DeliveryError("the FHIR bundle holds a resource whose type or id is not "
                                "FHIR syntax (id: [A-Za-z0-9.-]{1,64})", permanent=True)
        entries.append({"fullUrl": entry["fullUrl"], "resource": resource,
                        "request": {"method": "PUT", "url": f"{kind}/{rid}"}})
    return {"resourceType": "Bundle", "id": bundle["id"], "type": "transaction",
            "entry": entries}


def fhir_deliver(server: FhirServer, path: Path) -> str | None:
    """POST ``fhir.json`` (as a transaction) to the FHIR server's base URL.

    Raises:
        DeliveryError: the server answered with an error (or an entry failed).
        PacsError: no answer.
    """
    import requests

    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeliveryError(f"{path}: cannot read the FHIR bundle ({e})") from e
    where = f"FHIR transaction to {server.url}"
    session = session_for(server)
    try:
        response = session.post(
            server.url.rstrip("/"), json=fhir_transaction(bundle), timeout=server.timeout_s,
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
        response.raise_for_status()
        answer = response.json()
    except requests.RequestException as e:
        raise _http_error(where, e) from e
    except ValueError as e:
        raise DeliveryError(f"{where}: the answer is not JSON ({e})") from e
    finally:
        session.close()
    bad = [entry.get("response", {}).get("status", "") for entry in answer.get("entry", [])
           if not str(entry.get("response", {}).get("status", "")).startswith("2")]
    if bad:
        raise DeliveryError(f"{where}: entries failed with {', '.join(bad[:5])}")
    return None


@dataclass(frozen=True)
class RetrievedSeries:
    """What one WADO-RS series retrieval stored."""

    stored: int
    rejected: int


class Watcher:
    """Polls one DICOMweb source and spools what the routes want (see the module notes)."""

    def __init__(self, source: WatchSource, store: BridgeStore, routes: tuple[Route, ...], *,
                 quiet_period_s: float, validate: Callable[[Any], None]) -> None:
        self.source = source
        self.store = store
        self.routes = routes
        self.quiet_period_s = quiet_period_s
        self.validate = validate
        self._client: DICOMwebClient | None = None

    @property
    def client(self) -> DICOMwebClient:
        """The (lazily created) DICOMweb client."""
        if self._client is None:
            self._client = client_for(self.source.dicomweb)
        return self._client

    def run(self, stop: threading.Event, on_error: Callable[[str, BaseException], None]) -> None:
        """Poll until ``stop`` is set; errors are recorded and the next poll tries again."""
        while not stop.is_set():
            try:
                self.poll_once()
                self.store.endpoint_result(self.source.name)
            except Exception as e:  # noqa: BLE001 - an outage must not end the watcher
                self.store.endpoint_result(self.source.name, f"{type(e).__name__}: {e}")
                on_error(f"polling DICOMweb source {self.source.name}", e)
            stop.wait(self.source.poll_interval_s)

    def _search_studies(self) -> list[dict[str, Any]]:
        import requests

        filters: dict[str, Any] = {}
        if self.source.study_date_within_days is not None:
            start = date.today() - timedelta(days=self.source.study_date_within_days)
            filters["StudyDate"] = f"{start:%Y%m%d}-"
        try:
            return list(self.client.search_for_studies(
                fields=list(_STUDY_FIELDS), search_filters=filters or None,
                limit=self.source.page_size, get_remaining=True))
        except requests.RequestException as e:
            raise _http_error(f"QIDO-RS studies at {self.source.dicomweb.url}", e) from e

    def poll_once(self) -> int:
        """One round: returns how many studies were queued for analysis.

        Raises:
            PacsError: the server did not answer or refused.
        """
        now = time.time()
        queued = 0
        for item in self._search_studies():
            study_uid = _checked_uid(item, "StudyInstanceUID", self.source.name)
            if study_uid is None:
                continue
            modalities = _value(item, _tag("ModalitiesInStudy")) or []
            if isinstance(modalities, str):
                modalities = [modalities]
            signature = f"{_value(item, _tag('NumberOfStudyRelatedInstances'))}|" \
                        f"{','.join(sorted(map(str, modalities)))}"
            done, pending, since, _ = self.store.remote_study(self.source.name, study_uid)
            if signature == done:
                continue
            if signature != pending:
                self.store.remote_pending(self.source.name, study_uid, signature)
                if self.quiet_period_s > 0:
                    continue  # look again once it has been quiet
                since = now
            if now - since < self.quiet_period_s:
                continue
            queued += self.fetch_study(study_uid, signature)
        return queued

    def fetch_study(self, study_uid: str, signature: str) -> int:
        """Retrieve the study's wanted series that are new or grew; returns 1 if the study
        was queued for analysis."""
        import requests

        _, _, _, known = self.store.remote_study(self.source.name, study_uid)
        try:
            series = self.client.search_for_series(study_uid, fields=list(_SERIES_FIELDS))
        except requests.RequestException as e:
            raise _http_error(f"QIDO-RS series at {self.source.dicomweb.url}", e) from e
        own = self.store.own_series()
        counts: dict[str, int] = {}
        for item in series:
            uid = _checked_uid(item, "SeriesInstanceUID", self.source.name)
            modality = str(_value(item, _tag("Modality")) or "")
            if uid is None or uid in own or modality.upper() in RESULT_MODALITIES:
                continue
            body_part = str(_value(item, _tag("BodyPartExamined")) or "")
            description = str(_value(item, _tag("SeriesDescription")) or "")
            if not any(r.matches(modality, body_part, description) for r in self.routes):
                continue
            count = int(_value(item, _tag("NumberOfSeriesRelatedInstances")) or -1)
            if count < 0 or known.get(uid) != count:
                got = self.retrieve_series(study_uid, uid)
                if got.rejected:
                    log.warning("%s: %d instance(s) of a series could not be used",
                                self.source.name, got.rejected)
            counts[uid] = count
        queued = self.store.release_retrieved(self.source.name, study_uid, signature,
                                              {**known, **counts})
        if queued:
            log.info("%s: a study was retrieved and queued (%d series wanted)",
                     self.source.name, len(counts))
        return int(queued)

    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrievedSeries:
        """WADO-RS one series into the spool, each instance checked and written durably.

        Raises:
            PacsError: the retrieval failed (the instances stored so far stay stored).
        """
        import pydicom
        import requests

        stored = rejected = 0
        written: list[tuple[str, Path]] = []
        try:
            for ds in self.client.iter_series(study_uid, series_uid):
                try:
                    self.validate(ds)
                    if str(ds.StudyInstanceUID) != study_uid:
                        raise InvalidDicomError("an instance of another study than the one "
                                                "asked for")
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # noqa: BLE001 - one bad instance, not the series
                    log.warning("%s: skipped an instance (%s)", self.source.name,
                                why(e))
                    rejected += 1
                    continue
                # Durable file by file; recorded in batches (the study is held until the
                # whole retrieval is released, and a crash before a batch is recorded means
                # retrieving those instances again, not losing them).
                uid = str(ds.SOPInstanceUID)
                written.append((uid, self.store.write_instance(study_uid, uid, buffer.getvalue(),
                                                               sync_folder=False)))
                if len(written) >= 64:
                    stored += self._record(study_uid, written)
        except requests.RequestException as e:
            raise _http_error(f"WADO-RS at {self.source.dicomweb.url}", e) from e
        finally:
            stored += self._record(study_uid, written)
        return RetrievedSeries(stored=stored, rejected=rejected)

    def _record(self, study_uid: str, written: list[tuple[str, Path]]) -> int:
        count = len(written)
        self.store.record_instances(study_uid, written, calling_ae=self.source.name,
                                    source=self.source.name, hold=True)
        written.clear()
        return count
