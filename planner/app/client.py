"""The CLI's side of `bitplan --server URL COMMAND ...`: the command runs as a job of that server
(`POST /v1/jobs`, docs/service.md), and the CLI follows it to the end with the same kind of progress bar
a local run shows, then prints what the job made.

Only the standard library: a client of the service needs nothing the service's other users do not.  The
bearer token is `$BITPLAN_TOKEN`, as for the server.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from bitplan.db.types import BitplanError, InvalidInput

FINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.5


class ServerError(BitplanError):
    """The server could not be reached, or answered with an error that is not the request's fault."""


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--server {url[:60]!r}: give the service's address, e.g. http://127.0.0.1:8000")
        self.url, self.timeout = url.rstrip("/"), timeout
        self.token = token if token is not None else os.environ.get("BITPLAN_TOKEN")

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = _detail(e.read())
            if 400 <= e.code < 500:  # the request's fault: the server's one line says what to change
                raise InvalidInput(f"the server refused the job ({e.code}): {detail}") from None
            raise ServerError(f"the server at {self.url} failed ({e.code}): {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach the server at {self.url}: {reason}; is `bitplan serve` running "
                              f"there?") from None

    def run(self, kind: str, params: dict, *, progress: bool = True) -> dict:
        """Submit a job and follow it until it is over: its final document (ServerError if it failed)."""
        job = self.request("POST", "/v1/jobs", {"kind": kind, "params": params})
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc=f"{kind} job {job['id']}", unit="%", disable=not progress,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        try:
            while job["state"] not in FINAL:
                time.sleep(POLL_S)
                job = self.request("GET", f"/v1/jobs/{job['id']}")
                bar.n = round(100 * (job.get("progress") or 0))
                bar.set_postfix_str(f"{job['state']}: {job.get('message') or ''}"[:80], refresh=True)
        except KeyboardInterrupt:  # the user gave up on it: so should the server
            self.request("POST", f"/v1/jobs/{job['id']}/cancel")
            raise
        finally:
            bar.close()
        if job["state"] != "succeeded":
            raise ServerError(f"job {job['id']} {job['state']}: {job.get('error') or 'no reason given'}")
        return job


def _detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        return raw[:200].decode(errors="replace")
    if isinstance(detail, list):  # FastAPI's validation errors: the first names the field
        first = detail[0] if detail else {}
        return f"{'.'.join(str(x) for x in first.get('loc', []))}: {first.get('msg', '')}"
    return str(detail)[:300]
