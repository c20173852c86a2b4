"""A real HTTP server on 127.0.0.1 that answers as a Ray job server does, for the scheduler's tests.

It speaks the part of the job server's REST API that Ray's own `JobSubmissionClient` uses
when `gptforge schedule` fires (version, package check, submit, list, status), keeps its jobs
in memory, and answers an error status when a test says so (`fail`): what a real head does
when it is overloaded (500) or given the wrong credentials (401), without starting Ray.
A duplicate submission id is refused with a 400 and the job manager's message, as Ray does.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote


class JobServer:
    """The stand-in job server; `address` is its URL (with `user:password@`, percent-encoded, when it
    wants basic auth)."""

    def __init__(self, credentials: tuple[str, str] | None = None, new_status: str = "SUCCEEDED"):
        self.credentials = credentials
        self.new_status = new_status  # the status a submitted job gets (SUCCEEDED: it ends at once)
        self.jobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._failures: list[list] = []  # [method, path prefix, status, times left]
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        userinfo = ":".join(quote(part, safe="") for part in self.credentials) + "@" if self.credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def fail(self, method: str, path: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests `method path...` with `status`."""
        with self._lock:
            self._failures.append([method, path, status, times])

    def add_job(self, submission_id: str, experiment: str = "tiny", status: str = "RUNNING") -> None:
        """A job submitted by someone else (or by a scheduler that stopped before it heard the answer)."""
        with self._lock:
            self.jobs[submission_id] = _details(submission_id, "python -m pipelines.cli run", status,
                                                {"gptforge.experiment": experiment, "gptforge.run_name": ""})

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def answer(self, method: str, path: str, headers, body: bytes) -> tuple[int, object]:
        with self._lock:
            self.requests.append((method, path))
            if self.credentials and headers.get("Authorization") != "Basic " + base64.b64encode(
                    ":".join(self.credentials).encode()).decode():
                return 401, "Unauthorized: missing or wrong credentials"
            for failure in self._failures:
                if failure[3] > 0 and method == failure[0] and path.startswith(failure[1]):
                    failure[3] -= 1
                    return failure[2], "Traceback (most recent call last):\nRuntimeError: the head is overloaded"
            return self._route(method, path.rstrip("/"), body)

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if path == "/api/version":
            import ray

            return 200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "", "session_name": "stand-in"}
        if path.startswith("/api/packages/"):
            return 200, {}  # "already uploaded": the project is not zipped and sent for nothing
        if method == "POST" and path == "/api/jobs":
            request = json.loads(body)
            job_id = request["submission_id"]
            if job_id in self.jobs:
                return 400, (f"Traceback (most recent call last):\nValueError: Job with submission_id {job_id} "
                             f"already exists. Please use a different submission_id.\n")
            self.jobs[job_id] = _details(job_id, request["entrypoint"], self.new_status, request.get("metadata") or {})
            return 200, {"job_id": job_id, "submission_id": job_id}
        if method == "GET" and path == "/api/jobs":
            return 200, list(self.jobs.values())
        if method == "GET" and path.startswith("/api/jobs/"):
            job = self.jobs.get(path.removeprefix("/api/jobs/"))
            return (200, job) if job else (404, f"Job {path.removeprefix('/api/jobs/')} does not exist.")
        return 404, f"no route {method} {path}"


def _details(job_id: str, entrypoint: str, status: str, metadata: dict) -> dict:
    return {"type": "SUBMISSION", "job_id": None, "submission_id": job_id, "status": status,
            "entrypoint": entrypoint, "message": "", "start_time": int(time.time() * 1000), "end_time": None,
            "metadata": metadata, "runtime_env": {}}


def _handler(server: JobServer):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = server.answer(self.command, self.path, self.headers, body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _reply

        def log_message(self, *args) -> None:  # quiet: the tests look at `requests`
            pass

    return Handler
