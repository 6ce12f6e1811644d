"""The viewer: one page on loopback that shows a prediction and its explanations.

    python -m viewer.server start [--port-base 8080]   TorchServe if it is not running, then the page, in the background
    python -m viewer.server stop                       the page server that ``start`` left running
    python -m viewer.server run [--port-base 8080]     the page server in the foreground

The page (``viewer/index.html``) never talks to TorchServe: it posts its form to this
server's ``/explain``, which adds the inference token read from TorchServe's
``key_file.json`` and forwards the body. So the token never reaches the browser, and
re-reading the key file when TorchServe refuses the token follows key rotation. Bodies
are bounded by the handler's image limit (20 MiB) plus the form's own bytes.

Ports follow the project's convention: with ``--port-base N`` TorchServe's inference API
is N (management N+1, metrics N+2, gRPC N+4 and N+5) and this page is N+3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from handler.config import Limits
from serving import server as torchserve

ROOT = Path(__file__).resolve().parent.parent

PAGE = Path(__file__).resolve().parent / "index.html"
DEMO_DIR = ROOT / "build" / "demo"
PID_FILE = DEMO_DIR / "viewer.pid"
LOG_FILE = DEMO_DIR / "viewer.log"
DEFAULT_MODEL = "efficientnet_lite0"
HOST = "127.0.0.1"
MAX_IMAGE_BYTES = Limits().max_image_bytes
MAX_BODY_BYTES = MAX_IMAGE_BYTES + 64 * 1024  # the image, and the form's boundaries and text fields
MAX_DRAINED_BYTES = 64 * 1024 * 1024  # a larger refused body is not read: the connection is closed
TOKEN_REFUSED = "Token Authorization failed"
FORWARD_TIMEOUT_S = 120.0
# Nothing but this page's own inline code and the images it makes.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Inference:
    """TorchServe's inference API for one model, called with the current inference key."""

    def __init__(self, inference_url: str, key_file: Path, model: str) -> None:
        self.url = f"{inference_url.rstrip('/')}/predictions/{model}"
        self.inference_url = inference_url
        self.key_file = Path(key_file)
        self._token: str | None = None

    def _read_token(self) -> str:
        """The ``inference`` key of TorchServe's key file, read now."""
        try:
            return torchserve.read_token(self.key_file)
        except (OSError, ValueError, KeyError):
            raise ConnectionError(
                f"no inference key in {self.key_file}: is TorchServe running from {self.key_file.parent}?"
            ) from None

    def _post(self, body: bytes, content_type: str, token: str) -> tuple[int, bytes]:
        """One call: TorchServe's status and body; ConnectionError or TimeoutError when it does not answer."""
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=FORWARD_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (TimeoutError, urllib.error.URLError, OSError) as error:
            if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
                raise TimeoutError(f"the model server did not answer within {FORWARD_TIMEOUT_S:.0f} s") from None
            raise ConnectionError(f"the model server (TorchServe at {self.inference_url}) does not answer") from None

    def forward(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        """TorchServe's status and body for one request; on a refused token, the key file is
        read again (keys expire and rotate) and the request sent once more.

        Raises ConnectionError when TorchServe does not answer, TimeoutError when it is too slow.
        """
        token = self._token or self._read_token()
        status, answer = self._post(body, content_type, token)
        if status in (400, 401) and TOKEN_REFUSED.encode() in answer:
            token = self._read_token()
            status, answer = self._post(body, content_type, token)
        self._token = token
        return status, answer


def error_body(status: int, message: str) -> bytes:
    """An error in TorchServe's own shape, so the page reads every error the same way."""
    return json.dumps({"code": status, "type": HTTPStatus(status).phrase.replace(" ", ""), "message": message}).encode()


class PageHandler(BaseHTTPRequestHandler):
    """``GET /``: the page; ``POST /explain``: a multipart form forwarded to the model."""

    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, content_type: str = "application/json", close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        else:
            self._send(404, error_body(404, f"no page {self.path[:40]!r} here; the viewer is at /"))

    def do_POST(self) -> None:
        if self.path != "/explain":
            self._send(404, error_body(404, "post the form to /explain"), close=True)
            return
        content_type = self.headers.get("Content-Type", "")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, error_body(411, "the request needs a Content-Length"), close=True)
            return
        if int(length) > MAX_BODY_BYTES:
            self._refuse_large(int(length))
            return
        body = self.rfile.read(int(length))
        if not content_type.lower().startswith("multipart/form-data"):
            self._send(415, error_body(415, "send the photo as a multipart form with a file field 'image'"))
            return
        try:
            status, answer = self.server.inference.forward(body, content_type)
        except TimeoutError as error:
            self._send(504, error_body(504, str(error)))
            return
        except ConnectionError as error:
            self._send(502, error_body(502, f"{error}; start it with `make demo`"))
            return
        try:
            json.loads(answer)
        except ValueError:  # TorchServe's frontend answers some refusals (a body over its limit) without JSON
            answer = error_body(status, f"the model server answered HTTP {status} without a message")
        self._send(status, answer)

    def _refuse_large(self, length: int) -> None:
        """413 for a body over the limit; it is read and dropped first (up to a bound) so that
        the browser, still sending, gets the answer rather than a reset connection."""
        remaining = length if length <= MAX_DRAINED_BYTES else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        message = (
            f"the photo is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB ({MAX_IMAGE_BYTES:,} bytes), the model's limit"
        )
        self._send(413, error_body(413, message), close=True)


class ViewerServer(ThreadingHTTPServer):
    """The page server: one thread per connection, forwarding to ``inference``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], inference: Inference) -> None:
        super().__init__(address, PageHandler)
        self.inference = inference

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(port: int, inference_url: str, key_file: Path, model: str = DEFAULT_MODEL) -> ViewerServer:
    """A page server on loopback ``port`` (0: any free one) in front of ``inference_url``."""
    return ViewerServer((HOST, port), Inference(inference_url, key_file, model))


def _page_pid() -> int | None:
    """The pid of the page server ``start`` left running, if it still runs."""
    try:
        pid = int(PID_FILE.read_text().strip())
        if b"viewer.server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None  # the pid was reused by something else
    except (OSError, ValueError):
        return None
    return pid


def _wait_for_page(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the page server exited (code {process.returncode}); see {LOG_FILE}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"the page server did not answer at {url} within {timeout:.0f} s; see {LOG_FILE}")


def start(port_base: int | None, run_dir: Path, model: str) -> int:
    """TorchServe from ``run_dir`` if it is not running, then the page server in the background.

    ``port_base`` None: TorchServe's ports as ``make serve`` has them (config.properties').
    """
    running = torchserve.running_server(run_dir)
    if running:
        if port_base is not None and running.inference_url != f"http://{HOST}:{port_base}":
            print(
                f"error: TorchServe already runs from {run_dir} at {running.inference_url}, "
                f"not at PORT_BASE={port_base}: "
                "`make stop` first, or use its PORT_BASE",
                file=sys.stderr,
            )
            return 1
        inference_url = running.inference_url
        print(f"TorchServe already runs at {inference_url}")
    else:
        try:
            inference_url = torchserve.start([model], run_dir=run_dir, port_base=port_base).inference_url
        except torchserve.ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"TorchServe is up at {inference_url} (logs in {run_dir})")
    port_base = int(inference_url.rsplit(":", 1)[1])
    url = f"http://{HOST}:{port_base + torchserve.DEMO_OFFSET}/"
    if _page_pid() is not None:
        print(f"the viewer already runs (pid {_page_pid()}): {url}")
        return 0
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "viewer.server",
        "run",
        "--port-base",
        str(port_base),
        "--run-dir",
        str(run_dir),
        "--model",
        model,
    ]
    with open(LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    PID_FILE.write_text(f"{process.pid}\n")
    try:
        _wait_for_page(url, process)
    except RuntimeError as error:
        stop()
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"The viewer is at {url} (log and pid file in {DEMO_DIR}; `make stop` stops it and TorchServe)")
    return 0


def stop(timeout: float = 10.0) -> bool:
    """Stops the page server ``start`` left running; False if none ran."""
    pid = _page_pid()
    PID_FILE.unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "run"])
    parser.add_argument(
        "--port-base",
        type=int,
        help=(
            "TorchServe's inference port N; the page is at N+3 "
            "(default: $PORT_BASE, else 8080 and config.properties' ports)"
        ),
    )
    parser.add_argument(
        "--run-dir", type=Path, default=torchserve.DEFAULT_RUN_DIR, help="TorchServe's run folder (its key_file.json)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.action == "stop":
        print("viewer stopped" if stop() else "no viewer running")
        return 0
    if args.action == "start":
        return start(
            args.port_base if args.port_base is not None else torchserve.requested_port_base(), run_dir, args.model
        )
    port_base = args.port_base if args.port_base is not None else torchserve.port_base()
    server = make_server(
        port_base + torchserve.DEMO_OFFSET, f"http://{HOST}:{port_base}", run_dir / torchserve.KEY_FILE, args.model
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"viewer at {server.url}, forwarding to {server.inference.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
