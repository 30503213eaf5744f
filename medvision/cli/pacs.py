"""``medvision pacs listen|watch|status|retry|echo|send|query``: the PACS bridge and operator
commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medvision.cli.conventions import examples

__all__ = ["add_parser", "run"]


def _peer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--called-ae", default="ANY-SCP", help="the peer's AE title")
    parser.add_argument("--calling-ae", default="MEDVISION", help="our AE title")


def add_parser(subparsers: Any) -> None:
    """Register ``pacs`` and its actions."""
    parser = subparsers.add_parser("pacs", help="the DICOM bridge and network operations")
    actions = parser.add_subparsers(dest="pacs_action", required=True, metavar="ACTION")
    listen = actions.add_parser(
        "listen", help="run the bridge: receive, analyse, send results back",
        description="A Store SCP that spools received instances durably, analyses each study "
                    "after a quiet period with the pipeline its routing rules choose, and "
                    "sends SR/SEG/overlay results to the configured destination.")
    watch = actions.add_parser(
        "watch", help="run the bridge with its DICOMweb sources: poll, analyse, send back",
        description="Everything 'pacs listen' does, and also polls each DICOMweb source of "
                    "the settings (QIDO-RS) for new or changed studies that match the routes, "
                    "retrieves them (WADO-RS) into the durable spool and sends results back "
                    "into the source study (STOW-RS). State is kept in WORKDIR/jobs.sqlite: a "
                    "restart neither misses nor repeats a study.")
    for sub in (listen, watch):
        sub.add_argument("--config", required=True, type=Path, help="bridge settings (YAML)")
        sub.add_argument("--workdir", required=True, type=Path, help="spool and job database")
        sub.add_argument("--audit-log", type=Path,
                         help="audit log (SQLite); default: the settings' audit_log, else "
                              "WORKDIR/audit.sqlite")
        sub.add_argument("--audit-key", type=Path, help="pseudonymisation key file")
        sub.add_argument("--signing-key", type=Path,
                         help="Ed25519 key that signs the audit log's checkpoints "
                              "(default $MEDVISION_AUDIT_SIGNING_KEY, else unsigned)")
    status = actions.add_parser(
        "status", help="studies and results queued in a work folder",
        description="Reads the work folder without writing to it, so it answers on a full "
                    "disk. Says whether a bridge runs on the folder (pid, heartbeat) and marks a "
                    "study left 'processing' by a crash as stuck. Exit code 1 when any study "
                    "is failed or rejected or any result has failed.")
    status.add_argument("--workdir", required=True, type=Path)
    status.add_argument("--json", action="store_true")
    retry = actions.add_parser(
        "retry", help="re-queue failed results and failed or rejected studies",
        description="Failed results go back to the outbox with their attempts reset; a failed "
                    "or rejected study with nothing to send is analysed again (after a fix: a "
                    "new route, a pipeline installed). A running bridge picks them up at its "
                    "next round. An unknown study key is a usage error (exit 2).")
    retry.add_argument("--workdir", required=True, type=Path)
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("study", nargs="?", help="a study key as 'pacs status' shows it")
    target.add_argument("--all", action="store_true", help="every failed study and result")
    echo = actions.add_parser("echo", help="C-ECHO a peer")
    _peer_arguments(echo)
    send = actions.add_parser("send", help="C-STORE files to a peer")
    _peer_arguments(send)
    send.add_argument("paths", nargs="+", type=Path)
    query = actions.add_parser("query", help="C-FIND studies on a peer")
    _peer_arguments(query)
    query.add_argument("--level", default="STUDY", choices=["STUDY", "SERIES", "IMAGE"])
    query.add_argument("--match", action="append", default=[], metavar="KEYWORD=VALUE",
                       help="query keys, e.g. StudyInstanceUID=1.2.3 (repeatable)")
    examples(listen, "medvision pacs listen --config docs/examples/bridge.yaml --workdir "
                     "/var/lib/medvision-bridge --signing-key keys/audit-signing.key")
    examples(watch, "medvision pacs watch --config docs/examples/dicomweb.yaml --workdir "
                    "/var/lib/medvision-bridge")
    examples(status, "medvision pacs status --workdir /var/lib/medvision-bridge --json")
    examples(retry, "medvision pacs retry --workdir /var/lib/medvision-bridge --all")
    examples(echo, "medvision pacs echo --port 4242 --called-ae ORTHANC")
    examples(send, "medvision pacs send --port 4242 --called-ae ORTHANC scans/*.dcm")
    examples(query, "medvision pacs query --port 4242 --called-ae ORTHANC --match "
                    "ModalitiesInStudy=CR")
    for sub in (listen, watch, status, retry, echo, send, query):
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    from medvision.extras import require
    from medvision.pacs.config import Peer

    action = args.pacs_action
    require("pynetdicom", "pacs", f"'medvision pacs {action}'")
    if action in ("listen", "watch"):
        from medvision.cli.audit_options import signer_from_args
        from medvision.errors import ConfigError
        from medvision.pacs.bridge import Bridge
        from medvision.pacs.config import load_bridge_config

        require("highdicom", "pacs", f"'medvision pacs {action}'")
        config = load_bridge_config(args.config)
        if config.stow is not None or config.sources or not isinstance(
                config.destination, Peer | None):
            require("dicomweb_client", "dicomweb", "DICOMweb in the bridge")
            require("starlette", "dicomweb", "the STOW-RS listener")
            require("uvicorn", "dicomweb", "the STOW-RS listener")
        if config.fhir is not None:
            require("fhir.resources", "fhir", "FHIR output")
        if action == "watch" and not config.sources:
            raise ConfigError(f"{args.config}: no DICOMweb `sources` to watch ('pacs listen' "
                              "runs a bridge without them)")
        if args.audit_log is not None:
            config = config.model_copy(update={"audit_log": args.audit_log})
        Bridge(config, args.workdir, audit_key=args.audit_key,
               signer=signer_from_args(args)).serve_forever(watch=action == "watch")
        return 0
    if action == "status":
        from medvision.pacs.status import read_status
        from medvision.pacs.store import PROBLEM_STATES, OutboxState

        state = read_status(args.workdir)
        if args.json:
            print(json.dumps(state, indent=2))
        else:
            bridge = state["bridge"]
            if bridge["running"]:
                print(f"bridge running: pid {bridge['pid']} on {bridge['host']}, since "
                      f"{bridge['started']}, last heartbeat {bridge['heartbeat']}")
            elif bridge["pid"] is not None:
                print(f"no bridge running (pid {bridge['pid']} on {bridge['host']} last beat "
                      f"at {bridge['heartbeat']} and did not stop cleanly)")
            else:
                print("no bridge running on this work folder")
            for end in state["endpoints"]:
                print(f"{end['role']} {end['name']} ({end['detail']}): {end['queue']} queued, "
                      f"last success {end['last_success'] or 'never'}"
                      + (f", last error {end['last_error_at']}: {end['last_error']}"
                         if end["last_error"] else ""))
            for study in state["studies"]:
                stuck = " (stuck: no bridge is running; it resumes when one starts)" \
                    if study.get("stuck") else ""
                print(f"study {study['study']}: {study['state']}{stuck} ({study['instances']} "
                      f"instance(s), from {study['source']} {study['calling_ae']}, "
                      f"analysis attempts "
                      f"{study['attempts']})" + (f" - {study['error']}" if study["error"] else ""))
            waiting = [o for o in state["outbox"] if o["state"] in (OutboxState.PENDING,
                                                                    OutboxState.SENT_AWAITING)]
            undelivered = [o for o in state["outbox"] if o["state"] == OutboxState.FAILED]
            print(f"{len(state['outbox'])} result object(s), {len(waiting)} waiting to be sent "
                  f"or confirmed, {len(undelivered)} failed")
            for item in waiting + undelivered:
                print(f"  {item['kind']} for {item['study']} to {item['destination']}: "
                      f"{item['state']}, "
                      f"{item['attempts']} failed attempt(s)"
                      + (f", last error: {item['error']}" if item["error"] else ""))
        bad = any(s["state"] in PROBLEM_STATES for s in state["studies"]) or any(
            o["state"] == OutboxState.FAILED for o in state["outbox"])
        return 1 if bad else 0
    if action == "retry":
        from medvision.pacs.store import BridgeStore

        count = BridgeStore(args.workdir).retry(None if args.all else args.study)
        print(f"re-queued {count} failed result(s) or study(ies)")
        return 0
    peer = Peer(ae_title=args.called_ae, host=args.host, port=args.port)
    if action == "echo":
        from medvision.pacs.scu import echo

        status = echo(peer, calling_ae=args.calling_ae)
        print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: status 0x{status:04X}")
        return 0 if status == 0 else 1
    if action == "send":
        from medvision.pacs.scu import store

        statuses = store(peer, args.paths, calling_ae=args.calling_ae)
        failed = {p: s for p, s in statuses.items() if s != 0}
        print(f"sent {len(statuses) - len(failed)} of {len(statuses)} file(s)")
        for path, status in failed.items():
            print(f"  {path}: status 0x{status & 0xFFFF:04X}")
        return 1 if failed else 0
    from medvision.errors import ConfigError
    from medvision.pacs.scu import find

    malformed = [item for item in args.match if "=" not in item]
    if malformed:
        raise ConfigError(f"--match takes KEYWORD=VALUE (e.g. PatientID=123); got "
                          f"{', '.join(map(repr, malformed))}")
    query = dict(item.split("=", 1) for item in args.match)
    for key in ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy"):
        query.setdefault(key, "")
    for match in find(peer, query, level=args.level, calling_ae=args.calling_ae):
        print(json.dumps(match))
    return 0
