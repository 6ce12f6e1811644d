"""Ports: one PORT_BASE moves every server of the project; a taken port is named with its
process before TorchServe starts; `make serve` on a running server answers with its address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serving import server as ts_server
from tests.conftest import cli

ROOT = Path(__file__).resolve().parent.parent


def test_port_base_moves_the_server_the_tests_and_the_load_tests(monkeypatch, tmp_path):
    monkeypatch.setenv("PORT_BASE", "9000")
    assert ts_server.port_base() == 9000 and ts_server.port_base(ts_server.TESTS_OFFSET) == 19100
    _, settings = ts_server.write_config(ts_server.DEFAULT_CONFIG, tmp_path, ts_server.requested_port_base())
    assert [port for _, port in ts_server.listening_ports(settings)] == [9000, 9001, 9002, 9004, 9005]
    bases = subprocess.run(
        [
            sys.executable,
            "-c",
            "from serving.load import runner, faults, worstcase, overload; "
            "print(runner.PORT_BASE, faults.PORT_BASE, worstcase.PORT_BASE, overload.PORT_BASE)",
        ],
        cwd=ROOT,
        env=dict(os.environ, PORT_BASE="9000"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert bases.stdout.split() == ["29000", "29100", "29200", "29920"]


def test_without_port_base_the_configs_ports_are_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("PORT_BASE", raising=False)
    _, settings = ts_server.write_config(ts_server.DEFAULT_CONFIG, tmp_path, ts_server.requested_port_base())
    assert [port for _, port in ts_server.listening_ports(settings)] == [8080, 8081, 8082, 7070, 7071]
    assert ts_server.port_base(ts_server.TESTS_OFFSET) == 18180


@pytest.mark.parametrize("value", ["80", "abc", "65000"])
def test_a_port_base_out_of_range_is_refused_with_the_range(monkeypatch, value):
    monkeypatch.setenv("PORT_BASE", value)
    with pytest.raises(SystemExit, match=f"PORT_BASE='{value}' is not a port from 1024 to {ts_server.MAX_PORT_BASE}"):
        ts_server.port_base()


@pytest.fixture
def taken_port():
    """A port this process listens on, as another program would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_taken_port_is_named_in_one_line_with_its_process_and_the_way_out(taken_port, tmp_path):
    with pytest.raises(ts_server.ServerError) as error:
        ts_server.start([], run_dir=tmp_path, model_store=tmp_path, port_base=taken_port)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"port {taken_port} (inference) is in use by pid {os.getpid()} (")
    assert "stop it, or move every port of this project with e.g. PORT_BASE=" in message
    assert not (tmp_path / "logs").exists()  # TorchServe was never started


def test_port_holder_names_the_listener_and_nobody_for_a_free_port(taken_port):
    assert ts_server.port_holder(taken_port).startswith(f"pid {os.getpid()} (") and not ts_server.port_is_free(
        taken_port
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert ts_server.port_holder(free) is None and ts_server.port_is_free(free)


def test_serve_on_a_running_server_prints_its_address_and_a_request_and_exits_0(server, capsys, tmp_path):
    status = cli(
        "scripts/server.py",
        "start",
        "--run-dir",
        server.run_dir,
        "--models",
        "efficientnet_lite0",
        "--example-image",
        tmp_path / "cat.jpg",
    )
    out = capsys.readouterr().out
    assert status == 0
    assert f"TorchServe is already up at {server.inference_url}" in out
    assert f"curl -s {server.inference_url}/predictions/efficientnet_lite0" in out and server.token() in out
    assert f"scripts/client.py {tmp_path / 'cat.jpg'} --url {server.inference_url}" in out
