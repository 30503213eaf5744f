"""The PACS bridge: inputs that spool studies, workers that analyse them, a sender.

The data's path, one module each, over one store (:mod:`medvision.pacs.store`): in, a DIMSE
Store SCP (:mod:`medvision.pacs.receive`, which also holds the checks every received instance
passes), a STOW-RS endpoint (:mod:`medvision.pacs.stow`) and DICOMweb sources polled with
QIDO-RS/WADO-RS (:mod:`medvision.pacs.web`); analysis, here; out, the sender
(:mod:`medvision.pacs.send`). Received instances are written durably before success is
returned. A study quiet for
``quiet_period_s`` (or fully retrieved from a watched source) is routed to a pipeline by the
settings' rules, analysed like ``medvision analyze`` (report folder and audit record, the
sender as the actor), turned into DICOM results (SR, SEG, overlays) and, optionally, a FHIR
Bundle, and sent with retries: DICOM by C-STORE or STOW-RS to the study's destination (a
watched source gets its results back), FHIR to the FHIR server. Everything is resumable after
a crash or SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvision.analyze.batch import commit
from medvision.analyze.runner import AnalyzeOptions, run_study
from medvision.analyze.studies import collect_studies
from medvision.audit.log import AuditLog
from medvision.audit.records import Auditor, AuditRecord, Pseudonymizer
from medvision.audit.signing import Signer
from medvision.config import load_pipeline
from medvision.errors import (
    AuditError,
    ConfigError,
    DataError,
    PacsError,
)
from medvision.infer import Predictor
from medvision.io.header_checks import uid_problem
from medvision.pacs.config import (
    DESTINATION,
    DIMSE_SOURCE,
    FHIR_DESTINATION,
    STOW_SOURCE,
    BridgeConfig,
    Peer,
    Route,
)
from medvision.pacs.receive import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    DimseListener,
    printable,
    validate_instance,
    why,
)
from medvision.pacs.scu import STORAGE_COMMITMENT, tls_context
from medvision.pacs.send import Sender
from medvision.pacs.store import BridgeStore, ResultObject, StudyJob, StudyState
from medvision.pacs.stow import (
    CANNOT_UNDERSTAND as STOW_CANNOT_UNDERSTAND,
)
from medvision.pacs.stow import (
    OUT_OF_RESOURCES as STOW_OUT_OF_RESOURCES,
)
from medvision.pacs.stow import (
    PROCESSING_FAILURE,
    StoreOutcome,
    StowServer,
    parse_instance,
)
from medvision.pacs.throttle import EndpointBook, ThrottledLog

__all__ = ["CANNOT_UNDERSTAND", "OUT_OF_RESOURCES", "Bridge"]

log = logging.getLogger(__name__)

def _uid_or_empty(value: Any) -> str:
    return str(value) if uid_problem(value) is None else ""


_LOAD_LOCK = threading.Lock()


class Bridge:
    """One bridge over one work folder: ``start()`` listens and works; ``stop()`` ends both."""

    def __init__(self, config: BridgeConfig, workdir: str | Path, *,
                 audit_key: Path | None = None, signer: Signer | None = None) -> None:
        self.config = config
        self.store = BridgeStore(workdir)
        log_path = config.audit_log or self.store.workdir / "audit.sqlite"
        self.pseudonymizer = Pseudonymizer.from_file(audit_key or log_path.with_name("audit.key"))
        self.audit_log = AuditLog(log_path, signer=signer)
        self._local = threading.local()
        self._stop = threading.Event()
        self._server: Any = None
        self._stow: StowServer | None = None
        self._threads: list[threading.Thread] = []
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        self._errors = ThrottledLog(log, interval_s=60.0)
        self._endpoints_book = EndpointBook(self.store, self._errors)
        self._started = time.time()
        self.sender = Sender(config, self.store, audit_log=self.audit_log,
                             pseudonymizer=self.pseudonymizer, endpoints=self._endpoints_book,
                             errors=self._errors)

    # --- receiving -------------------------------------------------------------------------
    def _on_store(self, event: Any) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            validate_instance(ds)
            data = event.encoded_dataset(include_meta=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - any decoding problem (even a codec's Rust
            # panic, a BaseException) means "cannot understand"; the listener goes on
            log.warning("C-STORE: refused an instance from %s (answered 0x%04X): %s",
                        printable(calling), CANNOT_UNDERSTAND, why(e))
            return CANNOT_UNDERSTAND
        try:
            self.store.store_instance(study_uid=str(ds.StudyInstanceUID),
                                      sop_uid=str(ds.SOPInstanceUID), data=data,
                                      calling_ae=calling, source=DIMSE_SOURCE)
        except (OSError, PacsError) as e:
            self._errors.log(f"storing an instance from {calling} (answered 0xA700)", e)
            return OUT_OF_RESOURCES
        self._endpoints_book.success(DIMSE_SOURCE, "source")
        return 0x0000

    def _on_stow(self, data: bytes, sender: str, study: str | None) -> StoreOutcome:
        """One STOW-RS part: checked and stored like a C-STORE, or refused with a reason."""
        sop_class = sop_uid = ""
        try:
            ds = parse_instance(data)
            # echoed in the answer only when valid: a malformed UID is not repeated back
            sop_class = _uid_or_empty(ds.get("SOPClassUID"))
            sop_uid = _uid_or_empty(ds.get("SOPInstanceUID"))
            validate_instance(ds)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - as in _on_store
            reason = why(e)
            log.warning("STOW-RS: refused an instance from %s: %s", sender, reason)
            return StoreOutcome(sop_class, sop_uid, STOW_CANNOT_UNDERSTAND, reason)
        if study is not None and str(ds.StudyInstanceUID) != study:
            log.warning("STOW-RS: refused an instance from %s: not in the study of the URL",
                        sender)
            return StoreOutcome(sop_class, sop_uid, PROCESSING_FAILURE,
                                "Study Instance UID differs from the URL's")
        try:
            self.store.store_instance(study_uid=str(ds.StudyInstanceUID), sop_uid=sop_uid,
                                      data=data, calling_ae=sender, source=STOW_SOURCE)
        except (OSError, PacsError) as e:
            self._errors.log(f"storing an instance from {sender} (STOW-RS)", e)
            return StoreOutcome(sop_class, sop_uid, STOW_OUT_OF_RESOURCES, str(e))
        self._endpoints_book.success(STOW_SOURCE, "source")
        return StoreOutcome(sop_class, sop_uid)

    def _endpoints(self) -> list[tuple[str, str, str]]:
        """The configured sources and destinations ``(name, role, detail)``."""
        config = self.config
        found: list[tuple[str, str, str]] = []
        if config.port is not None:
            found.append((DIMSE_SOURCE, "source",
                          f"DIMSE {config.ae_title}@{config.host}:{config.port}"))
        if config.stow is not None:
            found.append((STOW_SOURCE, "source",
                          f"STOW-RS http{'s' if config.stow.tls else ''}://{config.stow.host}:"
                          f"{config.stow.port}/studies"))
        for source in config.sources:
            found.append((source.name, "source", f"DICOMweb {source.dicomweb.url}"))
            if source.results == "source":
                found.append((source.name, "destination",
                              f"STOW-RS {source.dicomweb.url}"))
        destination = config.destination
        if isinstance(destination, Peer):
            found.append((DESTINATION, "destination", f"DIMSE {destination.ae_title}@"
                          f"{destination.host}:{destination.port}"))
        elif destination is not None:
            found.append((DESTINATION, "destination", f"STOW-RS {destination.url}"))
        if config.fhir is not None and config.fhir.server is not None:
            found.append((FHIR_DESTINATION, "destination", f"FHIR {config.fhir.server.url}"))
        return found

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls.certificate), str(tls.key))
        if tls.ca is not None:
            context.load_verify_locations(str(tls.ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def start(self, *, watch: bool = True) -> None:
        """Recover interrupted work, start the configured inputs (the DICOMweb watchers only
        with ``watch``), the workers and the sender.

        Raises:
            PacsError: a listener could not start.
        """
        from medvision.devices import resolve_device

        resolve_device(self.config.device)  # a missing GPU stops the start (exit 2)
        for route in self.config.routes:  # a typo in a route fails here, not at a study
            try:
                load_pipeline(route.pipeline)
            except ConfigError as e:
                raise ConfigError(f"a route names pipeline {route.pipeline!r}, which cannot "
                                  f"be loaded: {e}") from e
        destination = self.config.destination
        if isinstance(destination, Peer) and destination.tls is not None:
            tls_context(destination.tls)  # unreadable certificates fail here, not per result
        recovered = self.store.recover()
        if recovered:
            log.info("recovered %d study(ies) interrupted mid-analysis", recovered)
        removed = self.store.clean_temporary_files()
        if removed:
            log.info("removed %d temporary file(s) left by interrupted writes", removed)
        self.store.register_endpoints(self._endpoints())
        self._import_heavy_modules()
        if self.config.workers > 1:
            import os

            import torch

            # The workers share the cores: one intra-op thread pool each, not one per core.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.config.workers))
        if self.config.port is not None:
            self._start_dimse(self.config.port)
        if self.config.stow is not None:
            self._stow = StowServer(self.config.stow, self._on_stow)
            try:
                self._stow.start()
            except PacsError as e:
                raise ConfigError(str(e)) from e
        self._threads = [threading.Thread(target=self._analysis_loop, daemon=True,
                                          name=f"medvision-bridge-analysis-{n}")
                         for n in range(self.config.workers)]
        self._threads.append(threading.Thread(target=self.sender.run, args=(self._stop,),
                                              kwargs={"started": self._started}, daemon=True,
                                              name="medvision-bridge-sender"))
        if watch:
            from medvision.pacs.web import Watcher

            for source in self.config.sources:
                watcher = Watcher(source, self.store, self.config.routes,
                                  quiet_period_s=self.config.quiet_period_s, validate=validate_instance)
                self._threads.append(threading.Thread(
                    target=watcher.run, args=(self._stop, self._errors.log), daemon=True,
                    name=f"medvision-bridge-watch-{source.name}"))
                log.info("watching %s (%s) every %.0f s", source.name, source.dicomweb.url,
                         source.poll_interval_s)
        for thread in self._threads:
            thread.start()

    def _start_dimse(self, port: int) -> None:
        from pynetdicom import AllStoragePresentationContexts, evt

        allowed = list(self.config.allowed_calling_aes)
        destination = self.config.destination
        if allowed and isinstance(destination, Peer) and destination.storage_commitment:
            # the destination opens associations to us for its commitment reports
            allowed.append(destination.ae_title)
        self._server = DimseListener(
            ae_title=self.config.ae_title, host=self.config.host, port=port,
            allowed_calling_aes=allowed, peer_networks=self.config.allowed_peer_networks,
            ssl_context=self._ssl_context(),
            handlers=[(evt.EVT_C_STORE, self._on_store),
                      (evt.EVT_N_EVENT_REPORT, self.sender.on_commitment_report)],
            contexts=[str(c.abstract_syntax) for c in AllStoragePresentationContexts],
            # the destination's storage commitment reports arrive as N-EVENT-REPORTs on
            # associations it opens to us
            extra_contexts=[(STORAGE_COMMITMENT, True)])
        self._server.start()

    def stop(self) -> None:
        """Stop listening and let the workers finish their current step."""
        self._stop.set()
        if self._server is not None:
            self._server.stop()
        if self._stow is not None:
            self._stow.stop()
        for thread in self._threads:
            thread.join(timeout=120)
        try:
            self.store.stopped()
        except Exception as e:  # noqa: BLE001 - a stale heartbeat says the same, a bit later
            self._errors.log("recording the stop", e)

    # --- working ---------------------------------------------------------------------------
    def _analysis_loop(self) -> None:
        while not self._stop.is_set():
            job = None
            try:
                # A study left in 'processing' by a step that could not even record its
                # failure (a full disk) goes back to the queue here, without a restart.
                with self._active_lock:
                    self.store.recover(keep=set(self._active))
                    job = self.store.claim_ready(self.config.quiet_period_s)
                    if job is not None:
                        self._active.add(job.study_uid)
                if job is not None:
                    try:
                        self._analyse_safely(job)
                    finally:
                        with self._active_lock:
                            self._active.discard(job.study_uid)
            except Exception as e:  # noqa: BLE001 - a full disk or locked database: wait
                self._errors.log("working on the queue", e)
            if job is None:
                self._stop.wait(self.config.poll_interval_s)

    def _predictor(self, pipeline: str) -> Predictor:
        """One loaded pipeline per worker thread (attributions hook the model's modules).

        Loading is serialised: MONAI's lazy imports are not safe to run from two threads at
        once (a half-initialised ``monai.networks.nets`` raises a circular-import error).
        """
        cache: dict[str, Predictor] = self._local.__dict__.setdefault("predictors", {})
        if pipeline not in cache:
            with _LOAD_LOCK:
                cache[pipeline] = Predictor.from_pipeline(pipeline, device=self.config.device)
        return cache[pipeline]

    @staticmethod
    def _import_heavy_modules() -> None:
        """Import what analyses use, once, here, before any worker thread starts."""
        import importlib

        for name in ("torch", "monai.networks.nets", "monai.transforms", "monai.inferers",
                     "captum.attr", "highdicom", "matplotlib.figure",
                     "matplotlib.backends.backend_agg"):
            try:
                importlib.import_module(name)
            except ImportError as e:  # the analysis itself will say what is missing
                log.warning("could not import %s in advance: %s", name, e)

    def _route(self, study: Any) -> Route | None:
        for route in self.config.routes:
            for entry in study.candidates:
                series = entry.series
                if series is None:
                    continue
                if route.matches(series.modality, str(series.header.get("BodyPartExamined", "")),
                                 str(series.header.get("SeriesDescription", ""))):
                    return route
        return None

    def _analyse_safely(self, job: StudyJob) -> None:
        """Analyse; any exception lands the study in a state (retried later, or failed)."""
        retry = self.config.retry
        try:
            self._analyse(job)
        except Exception as e:  # noqa: BLE001 - never strand a study
            # Input and configuration problems do not go away by retrying; anything else
            # (a full disk, an unwritable audit log, a model that failed to load) may.
            permanent = isinstance(e, DataError | ConfigError)
            reason = why(e)  # a library's message may quote header values: its type only
            state = self.store.fail_analysis(
                job.study_uid, reason, retry_in_s=None if permanent else retry.analysis_retry_s,
                max_attempts=retry.analysis_max_attempts)
            self._errors.log(f"study {self.store.study_folder_name(job.study_uid)}: analysing "
                             f"({state})", reason)
            if state == StudyState.FAILED:
                try:
                    self._audit_analysis(job, "failed", reason)
                except AuditError as audit_error:
                    self._errors.log("recording a failed analysis", audit_error)

    def _auditor(self, job: StudyJob) -> Auditor:
        """Audit records of a study's analysis name who sent it, and through which bridge."""
        who = {DIMSE_SOURCE: "calling_ae", STOW_SOURCE: "stow_sender"}.get(job.source,
                                                                          "dicomweb_source")
        return Auditor(self.audit_log, self.pseudonymizer,
                       actor={who: job.calling_ae, "via": self.config.ae_title})

    def _audit_analysis(self, job: StudyJob, status: str, reason: str) -> None:
        """An analysis that did not produce a report (rejected before it ran, or raised)."""
        auditor = self._auditor(job)
        auditor.record(AuditRecord(
            action="analyze", status=status, actor=auditor.actor, reason=reason,
            study_key=self.pseudonymizer.pseudonym("study", job.study_uid),
            inputs={"instances": job.instances, "source": job.source}))

    def _reject(self, job: StudyJob, reason: str) -> None:
        """The analysis cannot run: ``rejected`` with the reason, logged and audited."""
        key = self.store.study_folder_name(job.study_uid)
        state = self.store.reject_analysis(job.study_uid, reason)
        log.warning("study %s: %s (%s)", key, state, reason)
        self._audit_analysis(job, "rejected", reason)

    def _analyse(self, job: StudyJob) -> None:
        key = self.store.study_folder_name(job.study_uid)
        paths = self.store.instance_paths(job.study_uid)
        studies = [s for s in collect_studies(paths, pseudonymizer=self.pseudonymizer)
                   if s.candidates]
        if not studies:
            self._reject(job, f"no readable image among {len(paths)} instance(s)")
            return
        study = studies[0]
        route = self._route(study)
        if route is None:
            modalities = sorted({str(e.series.modality) for e in study.candidates
                                 if e.series is not None})
            self._reject(job, f"no route matches the study (modalities "
                              f"{', '.join(modalities) or 'unknown'})")
            return
        predictor = self._predictor(route.pipeline)
        import pydicom

        predecessors = []
        for previous in self.store.previous_results(job.study_uid, "SR"):
            try:
                predecessors.append(pydicom.dcmread(previous, stop_before_pixels=True))
            except (OSError, pydicom.errors.InvalidDicomError) as e:
                log.warning("study %s: an earlier SR is unreadable (%s)", key, why(e))
        fhir = self.config.fhir is not None
        outcome = run_study(study, predictor, self.store.results,
                            AnalyzeOptions(dicom=True, fhir=fhir), self.pseudonymizer,
                            predecessors=predecessors)
        commit(outcome, self._auditor(job), self.store.results)
        report = outcome.report
        if report.status == "rejected":  # the pipeline refused the input: audited by commit
            state = self.store.reject_analysis(job.study_uid, report.reason or "rejected")
            log.warning("study %s: %s (%s)", key, state, report.reason)
            return
        if report.status not in ("ok", "flagged"):  # it ran and failed: `pacs retry` re-runs
            state = self.store.fail_analysis(job.study_uid, report.reason or report.status,
                                             retry_in_s=None, max_attempts=1)
            log.warning("study %s: analysis %s (%s)", key, state, report.reason)
            return
        outputs = self._queue_results(job, study.key, report.files, fhir=fhir)
        state = self.store.finish_analysis(job.study_uid, outputs, analysis=job.analysis)
        log.info("study %s: %s, %d result object(s), %s", key, report.status, len(outputs),
                 state)

    def _queue_results(self, job: StudyJob, folder: str, files: Mapping[str, Any], *,
                       fhir: bool) -> list[ResultObject]:
        """Link an analysis' result files into its own outgoing folder (files already queued
        are never overwritten by a later analysis of the same study) and describe them for
        the outbox, from the report: kind, SOP Instance, series and SOP Class UIDs."""
        target = (self.store.outgoing / self.store.study_folder_name(job.study_uid)
                  / f"analysis-{job.analysis:03d}")
        target.mkdir(parents=True, exist_ok=True)
        destination = self.config.destination_for(job.source)
        outputs = []
        for item in files.get("dicom", []):
            path = target / Path(item["file"]).name
            source = self.store.results / folder / item["file"]
            try:  # the same file, not a second copy (same disk; saves space)
                path.unlink(missing_ok=True)
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)
            outputs.append(ResultObject(item["sop_instance_uid"], path, item["kind"],
                                        destination, item.get("series_instance_uid"),
                                        item.get("sop_class_uid")))
        bundle = self.store.results / folder / "fhir.json"
        if fhir and self.config.fhir and self.config.fhir.server and bundle.is_file():
            import json

            path = target / "fhir.json"
            shutil.copyfile(bundle, path)
            outputs.append(ResultObject(f"fhir:{json.loads(path.read_text())['id']}", path,
                                        "FHIR", FHIR_DESTINATION))
        return outputs

    def serve_forever(self, *, watch: bool = True) -> None:
        """Start, then block until SIGINT/SIGTERM."""
        import signal

        self.start(watch=watch)
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        while not stopped.wait(1.0):
            pass
        self.stop()
