"""The parts of many worker hosts that need no engine: the extra dockerd's command line and
how the rest of a chain is sent to one host's queue."""

from pathlib import Path

from rgrid.core import queueing
from rgrid.host.hosts import host_queue
from scripts.hosts import Engine


def test_an_extra_engine_keeps_to_its_own_folder_and_leaves_the_network_alone(tmp_path: Path):
    engine = Engine("h2", tmp_path)
    command = engine.command("overlay2")
    # In mount and network namespaces of its own: its sandboxes' mounts are its own, and
    # `--bridge none` cannot delete the main engine's docker0.
    assert command[: command.index("dockerd")] == [
        *("unshare", "--mount", "--net", "--propagation", "private")
    ]
    daemon = command[command.index("dockerd") + 1 :]
    options = dict(zip(daemon[::2], daemon[1::2], strict=False))
    # Its own configuration file: the machine's default one sets data-root, which conflicts.
    assert options["--config-file"] == str(tmp_path / "h2" / "daemon.json")
    for flag in ("--data-root", "--exec-root", "--pidfile"):
        assert options[flag].startswith(str(tmp_path / "h2")), flag
    assert options["-H"] == engine.docker_host == f"unix://{tmp_path}/h2/docker.sock"
    assert options["--storage-driver"] == "overlay2"
    assert {"--bridge", "none", "--iptables=false", "--ip-masq=false"} <= set(command)
    assert engine.data_dir == tmp_path / "h2" / "rgrid-data"


def test_the_rest_of_a_chain_goes_to_one_hosts_queue():
    rest = [{"task": queueing.STORE, "options": {}}, {"task": queueing.RUN}]
    queueing.route_rest(rest, host_queue("rgrid", "h3"))
    assert [r["options"]["queue"] for r in rest] == ["rgrid.host.h3"] * 2
    queueing.route_rest(None, "rgrid")  # nothing left: nothing to do
