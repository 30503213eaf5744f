"""A minimal FHIR server for tests (no real FHIR server installs here without the internet:
HAPI FHIR needs Java and Maven downloads). It implements the one interaction the bridge uses,
a ``transaction`` Bundle POSTed to the base URL (FHIR R4 3.1.0.11), strictly: the Bundle and
every resource validate with ``fhir.resources`` (R4B), each entry must be ``PUT Type/id`` with
the id matching, and the answer is a ``transaction-response`` with a status per entry
(201 created, 200 updated). A Bundle that does not validate gets 400 with an
OperationOutcome, as a server would answer."""

from __future__ import annotations

import threading
import time
from typing import Any

from orthanc_peer import free_port


class FhirStub:
    def __init__(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.resources: dict[str, dict[str, Any]] = {}
        self.transactions = 0
        self.rejected: list[str] = []
        self.port = free_port()
        app = Starlette(routes=[Route("/fhir", self._transaction, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "FHIR stub did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for key, r in self.resources.items() if key.startswith(resource_type + "/")]

    async def _transaction(self, request: Any) -> Any:
        from fhir.resources.R4B.bundle import Bundle
        from starlette.responses import JSONResponse

        def outcome(text: str) -> Any:
            self.rejected.append(text)
            return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invalid", "diagnostics": text}]}, status_code=400)

        try:
            body = await request.json()
            Bundle.model_validate(body)
        except Exception as e:  # noqa: BLE001 - any invalid input is a 400
            return outcome(f"invalid Bundle: {e}")
        if body.get("type") != "transaction":
            return outcome("expected a transaction Bundle")
        answers = []
        for entry in body["entry"]:
            resource, request_part = entry["resource"], entry.get("request", {})
            key = f"{resource['resourceType']}/{resource['id']}"
            if request_part.get("method") != "PUT" or request_part.get("url") != key:
                return outcome(f"entry {key}: expected PUT {key}")
            status = "200 OK" if key in self.resources else "201 Created"
            self.resources[key] = resource
            answers.append({"response": {"status": status, "location": key}})
        self.transactions += 1
        return JSONResponse({"resourceType": "Bundle", "type": "transaction-response",
                             "entry": answers}, media_type="application/fhir+json")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
