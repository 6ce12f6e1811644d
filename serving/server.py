"""Start, wait for and stop a TorchServe serving this project's archives; its ports and token.

``scripts/server.py start|stop`` is its command line. ``start`` runs ``torchserve
--start`` from the run folder, so its logs, PID file and token file (``key_file.json``)
stay there, and waits until every model's workers are READY according to the management
API: ``/ping`` says Healthy even while workers crash-loop. ``scripts/server.py start``
then prints a request that works; if the server of that run folder is already up, it
prints the same and exits 0.

Ports: with ``--port-base N`` (default: the ``PORT_BASE`` environment variable, which
``make`` passes on) the three HTTP ports become N (inference), N+1 (management) and N+2
(metrics), and the two gRPC ports N+4 (inference) and N+5 (management); N+3 is the demo
page's. Without either, config.properties' ports. Every other server this project starts
(tests, load tests) takes its base as an offset from the same ``PORT_BASE``
(:func:`port_base`), so one setting moves them all. A port that is taken is named before
TorchServe starts, with the process holding it where the system shows it.
The integration tests, the load tests and the viewer use the same functions, and
``read_token`` is the one place that reads a token from ``key_file.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config.properties"
DEFAULT_RUN_DIR = ROOT / "build" / "serve"
DEFAULT_STORE = ROOT / "model_store"
KEY_FILE = "key_file.json"

# Ports: each server uses its base .. base+5. The bases are offsets from PORT_BASE.
DEFAULT_PORT_BASE = 8080
DEMO_OFFSET = 3
TESTS_OFFSET = 10100
LOADTEST_OFFSET = 20000
FAULTS_OFFSET = 20100
WORSTCASE_OFFSET = 20200
OVERLOAD_OFFSET = 20920
# The highest base whose servers (the overload test's N+20920+5 at most) fit under 65536.
MAX_PORT_BASE = 65535 - OVERLOAD_OFFSET - 5


class ServerError(RuntimeError):
    """TorchServe did not come up, or stopped; the message says what to look at."""


@dataclass(frozen=True)
class Server:
    """Where a running TorchServe listens, and where its files are."""

    run_dir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_inference_port: int

    @property
    def key_file(self) -> Path:
        return self.run_dir / KEY_FILE

    def token(self, kind: str = "inference") -> str:
        """The current ``inference`` or ``management`` key from TorchServe's key file."""
        return read_token(self.key_file, kind)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def workers(self, model: str) -> list[dict]:
        """``model``'s workers as the management API describes them (``pid``, ``status``, ...)."""
        request = urllib.request.Request(
            f"{self.management_url}/models/{model}", headers={"Authorization": f"Bearer {self.token('management')}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            workers: list[dict] = json.loads(response.read())[0]["workers"]
        return workers

    def worker_pids(self, model: str) -> list[int]:
        """The process ids of ``model``'s workers that are ready."""
        return sorted(worker["pid"] for worker in self.workers(model) if worker["status"] == "READY")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system, all threads) process ``pid`` has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_token(key_file: Path, kind: str = "inference") -> str:
    """The current ``inference`` or ``management`` key of TorchServe's ``key_file.json``.

    Raises OSError when the file cannot be read, ValueError when it is not JSON and
    KeyError when it holds no such key (TorchServe may be writing it).
    """
    return json.loads(Path(key_file).read_text())[kind]["key"]


def requested_port_base() -> int | None:
    """``PORT_BASE`` from the environment, or None if unset; exits with a message if invalid."""
    text = os.environ.get("PORT_BASE", "").strip()
    if not text:
        return None
    if not text.isdigit() or not 1024 <= int(text) <= MAX_PORT_BASE:
        raise SystemExit(
            f"error: PORT_BASE={text[:20]!r} is not a port from 1024 to {MAX_PORT_BASE} "
            f"(the load tests use PORT_BASE + {OVERLOAD_OFFSET + 5})"
        )
    return int(text)


def port_base(offset: int = 0) -> int:
    """The base port of one of this project's servers: ``PORT_BASE`` (default 8080) + ``offset``."""
    base = requested_port_base()
    return (DEFAULT_PORT_BASE if base is None else base) + offset


def read_properties(path: Path) -> dict[str, str]:
    """The key=value lines of a Java properties file (comments skipped)."""
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


def _literal_regex(text: str) -> str:
    """A Java regex matching ``text`` only, without backslashes (a properties file eats them)."""
    return "".join(f"[{c}]" if c in ".^$*+?{}[]|()" else c for c in text)


def write_config(
    base: Path,
    run_dir: Path,
    port_base: int | None,
    model_store: Path = DEFAULT_STORE,
    extra: Mapping[str, str] | None = None,
) -> tuple[Path, dict[str, str]]:
    """The config the server runs with: ``base``, with other ports and ``extra`` properties if asked.

    ``allowed_urls`` becomes the model store itself, and a relative ``metrics_config``
    is resolved against ``base``'s folder (TorchServe would resolve it against the run folder).
    """
    properties = read_properties(base)
    properties["allowed_urls"] = f"file://{_literal_regex(str(Path(model_store).resolve()))}/.*"
    if "metrics_config" in properties:
        properties["metrics_config"] = str((Path(base).resolve().parent / properties["metrics_config"]).resolve())
    if port_base is not None:
        properties.update(
            inference_address=f"http://127.0.0.1:{port_base}",
            management_address=f"http://127.0.0.1:{port_base + 1}",
            metrics_address=f"http://127.0.0.1:{port_base + 2}",
            grpc_inference_port=str(port_base + 4),
            grpc_management_port=str(port_base + 5),
        )
    properties.update(extra or {})
    config = run_dir / "config.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    return config, properties


def _torchserve() -> str:
    local = Path(sys.executable).parent / "torchserve"
    found = str(local) if local.exists() else shutil.which("torchserve")
    if not found:
        raise ServerError("torchserve is not installed: run `make serve`, which installs it into .venv")
    if not shutil.which("java"):
        raise ServerError(
            "TorchServe needs Java 17 (`java` is not on PATH): "
            "install a JDK 17, e.g. `apt-get install openjdk-17-jdk-headless`"
        )
    return found


def _environment(run_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    # TEMP holds the PID file: one per run folder, so servers do not see each other.
    env.update(TEMP=str(run_dir), LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"))
    return env


def _server(run_dir: Path, settings: Mapping[str, str]) -> Server:
    return Server(
        run_dir,
        settings["inference_address"],
        settings["management_address"],
        settings["metrics_address"],
        int(settings.get("grpc_inference_port", "7070")),
    )


def running_server(run_dir: Path = DEFAULT_RUN_DIR) -> Server | None:
    """The TorchServe started from ``run_dir`` if it still runs, else None.

    Its addresses come from the config it was given.
    """
    run_dir = Path(run_dir).resolve()
    if not is_running(run_dir):
        return None
    try:
        return _server(run_dir, read_properties(run_dir / "config.properties"))
    except (OSError, KeyError, ValueError):
        return None


def start(
    models: list[str],
    *,
    run_dir: Path = DEFAULT_RUN_DIR,
    config: Path = DEFAULT_CONFIG,
    model_store: Path = DEFAULT_STORE,
    port_base: int | None = None,
    properties: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> Server:
    """Starts TorchServe with ``models`` (names of ``<name>.mar`` in the store), waits for READY.

    ``properties`` override those of ``config`` (e.g. ``service_envelope``); ``env``
    adds environment variables for the server and its workers (e.g.
    ``OMP_NUM_THREADS``, which sets each worker's PyTorch threads).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in models if not (Path(model_store) / f"{name}.mar").exists()]
    if missing:
        raise ServerError(f"no archive for {missing} in {model_store}: build it with scripts/build_mar.py")
    config_file, settings = write_config(Path(config), run_dir, port_base, model_store, properties)
    server = _server(run_dir, settings)
    busy = busy_ports_message(settings)
    if busy:
        raise ServerError(busy)
    command = [
        _torchserve(),
        "--start",
        "--ncs",  # no config snapshot: start exactly what is asked, every time
        "--ts-config",
        str(config_file),
        "--model-store",
        str(Path(model_store).resolve()),
    ]
    if models:
        command += ["--models", *[f"{name}={name}.mar" for name in models]]
    with open(run_dir / "torchserve.out", "ab") as out:
        subprocess.run(
            command, cwd=run_dir, env=_environment(run_dir, env), stdout=out, stderr=subprocess.STDOUT, check=True
        )
    try:
        wait_ready(server, models, timeout)
    except ServerError:
        stop(run_dir)
        raise
    return server


def listening_ports(settings: Mapping[str, str]) -> list[tuple[str, int]]:
    """The (role, port) pairs TorchServe listens on with ``settings``."""

    def port(address: str) -> int:
        return int(address.rstrip("/").rsplit(":", 1)[1])

    return [
        ("inference", port(settings["inference_address"])),
        ("management", port(settings["management_address"])),
        ("metrics", port(settings["metrics_address"])),
        ("gRPC inference", int(settings.get("grpc_inference_port", "7070"))),
        ("gRPC management", int(settings.get("grpc_management_port", "7071"))),
    ]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` on loopback now (as TorchServe does, reusing TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on TCP ``port``, where /proc shows it.

    Linux lists listening sockets in /proc/net/tcp{,6} (state 0A) with their inode, and
    each process's open sockets as /proc/<pid>/fd links to ``socket:[inode]``; another
    user's processes are not readable unless we are root, and then None.
    """
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return None
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in sockets for fd in (process / "fd").iterdir()):
                command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {process.name} ({command[:100]})"
        except OSError:
            continue
    return None


def free_port_base(start: int = DEFAULT_PORT_BASE + 1000, step: int = 1000) -> int | None:
    """The first base from ``start`` (in ``step``s) whose six ports are free, for the advice."""
    for base in range(start, MAX_PORT_BASE + 1, step):
        if all(port_is_free(base + offset) for offset in range(6)):
            return base
    return None


def busy_ports_message(settings: Mapping[str, str]) -> str | None:
    """One line naming the ports of ``settings`` that are taken, by whom, and the way out; None if all are free."""
    taken = []
    for role, port in listening_ports(settings):
        if not port_is_free(port):
            holder = port_holder(port)
            taken.append(
                f"port {port} ({role}) is in use by {holder}"
                if holder
                else f"port {port} ({role}) is in use (the system does not show by which process; try `ss -ltnp`)"
            )
    if not taken:
        return None
    free = free_port_base()
    advice = f"e.g. PORT_BASE={free} (make serve PORT_BASE={free})" if free else "PORT_BASE=N"
    return f"{'; '.join(taken)}: stop it, or move every port of this project with {advice}"


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _load_failure(server: Server, model: str) -> str | None:
    """The worker's error if TorchServe reports that ``model`` failed to load, else None.

    A worker that fails to load is retried forever while the model never becomes READY;
    a handler error at start-up (bad config, weights that do not fit) is not transient.
    """
    try:
        if f"Load model failed: {model}," not in (server.log_dir / "ts_log.log").read_text(errors="replace"):
            return None
        errors = re.findall(
            r"MODEL_LOG - (\w+(?:Error|Exception): .*)", (server.log_dir / "model_log.log").read_text(errors="replace")
        )
    except OSError:
        return None
    return errors[-1] if errors else "the worker died while loading"


def _exit_reason(server: Server) -> str:
    """Why TorchServe exited at start-up, in one line where its log says (a port taken meanwhile), and where to look."""
    where = f"see {server.run_dir}/torchserve.out and {server.log_dir}/ts_log.log"
    try:
        log = (server.log_dir / "ts_log.log").read_text(errors="replace")
    except OSError:
        log = ""
    if "Address already in use" in log:
        return (
            f"TorchServe exited: a port was taken by another process while it started ({where}); "
            f"{busy_ports_message(read_properties(server.run_dir / 'config.properties')) or 'try again'}"
        )
    return f"TorchServe exited; {where}"


def wait_ready(server: Server, models: list[str], timeout: float) -> None:
    """Polls the management API until it answers and each model has a READY worker; fails fast if one cannot load."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    while True:
        if time.monotonic() > deadline:
            raise ServerError(
                f"models {pending} not READY after {timeout:.0f} s; see {server.log_dir}/model_log.log and ts_log.log"
            )
        if not is_running(server.run_dir):
            raise ServerError(_exit_reason(server))
        failure = _load_failure(server, pending[0]) if pending else None
        if failure:
            raise ServerError(
                f"model {pending[0]} failed to load: {failure} (full log: {server.log_dir}/model_log.log)"
            )
        try:
            if server.key_file.exists():
                path = f"/models/{pending[0]}" if pending else "/models"
                status, body = _get(f"{server.management_url}{path}", server.token("management"))
                if status == 200 and not pending:
                    return
                if status == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0].get("workers", [])):
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass  # not listening yet, or the key file is being written
        time.sleep(0.5)


def server_pid(run_dir: Path) -> int | None:
    """The PID of the TorchServe started from ``run_dir``, from its PID file; None without one."""
    pid_file = Path(run_dir) / ".model_server.pid"
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def is_running(run_dir: Path) -> bool:
    """Whether the TorchServe started from ``run_dir`` (its PID file) still runs."""
    pid = server_pid(run_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 60.0) -> bool:
    """Stops the TorchServe of ``run_dir`` and waits for it to exit; False if none ran."""
    run_dir = Path(run_dir).resolve()
    if not is_running(run_dir):
        return False
    subprocess.run(
        [_torchserve(), "--stop"],
        cwd=run_dir,
        env=_environment(run_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    deadline = time.monotonic() + timeout
    while is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.3)
    if is_running(run_dir):
        os.kill(server_pid(run_dir), 9)
    return True


def example_request(server: Server, model: str, image: Path) -> str:
    """A curl command that works against ``server`` (token inline)."""
    host = re.sub(r"^https?://", "", server.inference_url)
    return (
        f"curl -s http://{host}/predictions/{model} \\\n"
        f"  -H 'Authorization: Bearer {server.token()}' \\\n"
        f"  -H 'Content-Type: image/jpeg' --data-binary @{image}"
    )


def print_usage(server: Server, models: list[str], image: Path) -> None:
    """What ``scripts/server.py start`` prints once the models are READY: a curl request and a client command."""
    print(f"models READY: {', '.join(models)}\n\nTry it:\n")
    print(example_request(server, models[0], image.resolve()))
    url = "" if server.inference_url == f"http://127.0.0.1:{DEFAULT_PORT_BASE}" else f" --url {server.inference_url}"
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python  # the environment make made
    print(
        "\nor, to print the answer and save the maps as PNG files:\n\n"
        f"  {python} scripts/client.py {image}{url} --out build/client"
    )
