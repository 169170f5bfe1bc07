"""The pure helpers of govdb.localpg; starting a real server is what scripts/test.sh does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from govdb import localpg
from govdb.errors import GovdbError
from govdb.localpg import LocalPostgresError


def _fake_postgres(lib: Path, share: Path, major: str, *, age: bool, tools=("postgres", "initdb", "pg_ctl", "psql")):
    bin_dir = lib / major / "bin"
    bin_dir.mkdir(parents=True)
    for tool in tools:
        (bin_dir / tool).write_text("")
    ext = share / major / "extension"
    ext.mkdir(parents=True)
    if age:
        (ext / "age.control").write_text("default_version = '1.5.0'\n")
    return bin_dir


def test_url_is_loopback_superuser_without_password():
    assert localpg.build_url(55499) == "postgresql://postgres@127.0.0.1:55499/governance"


def test_error_belongs_to_the_family():
    assert issubclass(LocalPostgresError, GovdbError)


def test_state_round_trip(tmp_path):
    state = {"route": "chroot", "port": 55499, "root": "/r", "bin_dir": "/usr/lib/postgresql/17/bin",
             "mount": "/r/govdb/x", "as_root": True}
    localpg.write_state(tmp_path, state)
    assert localpg.read_state(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == [localpg.STATE_FILE]


def test_missing_state_is_none(tmp_path):
    assert localpg.read_state(tmp_path) is None


@pytest.mark.parametrize("text", ["{not json", "[]", '{"route": "docker", "port": 1}', '{"route": "system", "port": "1"}'])
def test_damaged_state_names_the_file(tmp_path, text):
    (tmp_path / localpg.STATE_FILE).write_text(text)
    with pytest.raises(LocalPostgresError, match="is damaged"):
        localpg.read_state(tmp_path)


def test_system_route_takes_newest_postgres_with_age(tmp_path):
    lib, share = tmp_path / "lib", tmp_path / "share"
    _fake_postgres(lib, share, "15", age=False)
    bin16 = _fake_postgres(lib, share, "16", age=True)
    assert localpg.find_system_postgres(lib, share) == (bin16, "16")
    bin17 = _fake_postgres(lib, share, "17", age=True)
    assert localpg.find_system_postgres(lib, share) == (bin17, "17")


def test_system_route_needs_age_and_every_tool(tmp_path):
    lib, share = tmp_path / "lib", tmp_path / "share"
    assert localpg.find_system_postgres(lib, share) is None
    _fake_postgres(lib, share, "15", age=False)
    _fake_postgres(lib, share, "17", age=True, tools=("postgres", "initdb"))
    (lib / "common").mkdir()
    assert localpg.find_system_postgres(lib, share) is None


def test_root_validity(tmp_path):
    root = tmp_path / "root"
    assert not localpg.root_is_valid(root)
    _fake_postgres(root / "usr/lib/postgresql", root / "usr/share/postgresql", "17", age=True)
    assert not localpg.root_is_valid(root)  # no postgres user yet
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                     "postgres:x:100:102:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n")
    assert localpg.chroot_postgres_ids(root) == (100, 102)
    assert localpg.root_is_valid(root)
    (root / "usr/share/postgresql/17/extension/age.control").unlink()
    assert not localpg.root_is_valid(root)


def test_apt_candidate():
    debian13 = ("postgresql-17-age:\n  Installed: (none)\n  Candidate: 1.5.0-2\n  Version table:\n"
                "     1.5.0-2 500\n        500 http://deb.debian.org/debian trixie/main amd64 Packages\n")
    assert localpg.parse_apt_candidate(debian13) == "1.5.0-2"
    assert localpg.parse_apt_candidate("postgresql-17-age:\n  Installed: (none)\n  Candidate: (none)\n") is None
    assert localpg.parse_apt_candidate("") is None  # apt-cache prints nothing for an unknown package


def test_mount_key_is_stable_and_distinct(tmp_path):
    assert localpg.mount_key(tmp_path / "a") == localpg.mount_key(tmp_path / "a")
    assert localpg.mount_key(tmp_path / "a") != localpg.mount_key(tmp_path / "b")
    assert len(localpg.mount_key(tmp_path)) == 16


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("GOVDB_PG_ROOT_CACHE", raising=False)
    assert localpg.default_cache_dir() == Path.home() / ".cache/govdb/pg-root-trixie"
    monkeypatch.setenv("GOVDB_PG_ROOT_CACHE", str(tmp_path / "roots"))
    assert localpg.default_cache_dir() == tmp_path / "roots"


@pytest.fixture
def sleeper(tmp_path):
    """A live process whose working directory is tmp_path/cwd, as a postmaster's is its cluster."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=cwd)
    yield proc
    proc.kill()
    proc.wait()


def test_running_pid_recognises_the_cluster_by_working_directory(tmp_path, sleeper):
    cluster = tmp_path / "cwd"
    (cluster / "postmaster.pid").write_text(f"{sleeper.pid}\n/govdb/x/data\n")
    assert localpg.running_pid(cluster) == sleeper.pid
    other = tmp_path / "other"
    other.mkdir()
    (other / "postmaster.pid").write_text(f"{sleeper.pid}\n")
    assert localpg.running_pid(other) is None  # the pid was reused by an unrelated process


def test_running_pid_of_dead_or_missing_or_garbage(tmp_path):
    assert localpg.running_pid(tmp_path) is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "postmaster.pid").write_text(f"{dead.pid}\n")
    assert localpg.running_pid(tmp_path) is None
    (tmp_path / "postmaster.pid").write_text("garbage\n")
    assert localpg.running_pid(tmp_path) is None


def test_zombie_is_not_running(tmp_path):
    child = subprocess.Popen(["true"], cwd=tmp_path)
    # Not waited for: the child stays a zombie, as a killed postmaster does until it is reaped.
    deadline = time.monotonic() + 5
    while not localpg._is_zombie(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert localpg._is_zombie(child.pid)
    (tmp_path / "postmaster.pid").write_text(f"{child.pid}\n")
    assert localpg.running_pid(tmp_path) is None
    child.wait()


def test_postmaster_pid_naming_a_reused_pid_is_moved_aside(tmp_path, sleeper):
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "postmaster.pid").write_text(f"{sleeper.pid}\n")
    messages: list[str] = []
    localpg._clear_dead_postmaster(cluster, messages.append)
    assert not (cluster / "postmaster.pid").exists()
    assert (cluster / "postmaster.pid.stale").exists()
    assert "moved it aside" in messages[0]


def test_postmaster_pid_of_a_dead_pid_is_left_to_postgres(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "postmaster.pid").write_text(f"{dead.pid}\n")
    localpg._clear_dead_postmaster(tmp_path, pytest.fail)
    assert (tmp_path / "postmaster.pid").exists()


def test_status_url_stop_without_a_server(tmp_path):
    assert localpg.status(tmp_path) is None
    assert localpg.stop(tmp_path / "never-made") is False
    assert localpg.stop(tmp_path) is False
    with pytest.raises(LocalPostgresError, match="no local PostgreSQL was started in"):
        localpg.url(tmp_path)


def test_url_of_a_stopped_server(tmp_path):
    localpg.write_state(tmp_path, {"route": "system", "port": 55499, "bin_dir": "/x/17/bin", "root": None,
                                   "mount": None, "as_root": False})
    info = localpg.status(tmp_path)
    assert info["running"] is False and info["port"] == 55499 and info["url"].endswith(":55499/governance")
    with pytest.raises(LocalPostgresError, match="is not running"):
        localpg.url(tmp_path)


def test_start_refuses_a_bad_or_busy_port_before_provisioning(tmp_path):
    with pytest.raises(LocalPostgresError, match="1-65535"):
        localpg.start(tmp_path, port=70000, log=pytest.fail)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LocalPostgresError, match=f"port {port} .* in use"):
            localpg.start(tmp_path, port=port, log=pytest.fail)
    assert localpg.read_state(tmp_path) is None


def test_unusable_data_dir_is_an_error_not_a_traceback():
    with pytest.raises(LocalPostgresError, match="cannot use"):
        localpg.start(Path("/proc/govdb-cannot-be-here"), port=55499, log=pytest.fail)


def test_state_file_is_json_with_sorted_keys(tmp_path):
    localpg.write_state(tmp_path, {"route": "apt", "port": 5, "b": 1, "a": 2})
    text = (tmp_path / localpg.STATE_FILE).read_text()
    assert list(json.loads(text)) == ["a", "b", "port", "route"]
