"""govdb pg start/stop/url/status: a local PostgreSQL 17 + Apache AGE for development, tests and CI.

The server listens on 127.0.0.1 only, as superuser ``postgres`` with trust
authentication: any local user can connect without a password. That is
acceptable for a throwaway development/test server and for nothing else.

``start`` takes the first route that works and says which:

1. ``system``: a PostgreSQL on this machine whose extension directory has
   ``age.control``; run as the ``postgres`` system user when we are root.
2. ``apt``: apt offers ``postgresql-17-age`` (Debian 13): install it, then
   run as in ``system``.
3. ``chroot`` (root only): a Debian 13 root built once with debootstrap and
   cached in ``~/.cache/govdb/pg-root-trixie`` (or ``$GOVDB_PG_ROOT_CACHE``;
   ``$GOVDB_DEBIAN_MIRROR`` picks the mirror).

The data directory holds the cluster (``data/``), the server log
(``postgres.log``) and ``govdb-pg.json``, which tells ``stop``, ``url`` and
``status`` in another process how the server was started. When the server
runs as another user that cannot reach the data directory, and always in the
chroot, the data directory is bind-mounted where that user can reach it
while the server runs; ``stop`` unmounts it. Do not delete the cache root
while a server runs from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import GovdbError

DEFAULT_PORT = 55432
DATABASE = "governance"
PG_MAJOR = "17"
SUITE = "trixie"
PACKAGES = (f"postgresql-{PG_MAJOR}", f"postgresql-{PG_MAJOR}-age")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STATE_FILE = "govdb-pg.json"
LOCK_FILE = ".govdb-pg.lock"
CLUSTER = "data"
LOG_FILE = "postgres.log"
ROUTES = ("system", "apt", "chroot")
CHROOT_MOUNTS = "govdb"  # data directories appear in the root as /govdb/<key>
SYSTEM_MOUNTS = Path("/run/govdb-pg")  # ... and for the system route as /run/govdb-pg/<key>
PROC_MARKER = ".proc-mounted-by-govdb"
# Not shared_preload_libraries=age: AGE 1.5's hooks then break DROP and TRUNCATE in every
# database lacking the extension (apache/age#2180, #2520). Sessions run LOAD 'age' instead.
SERVER_OPTIONS = ""
# The chroot gets a fixed environment: the host's locale or PG* variables must not leak in.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/var/lib/postgresql"}

Log = Callable[[str], None]


class LocalPostgresError(GovdbError):
    """The local PostgreSQL could not be provisioned, started, stopped or found."""


@dataclass(frozen=True)
class LocalServer:
    """A running local PostgreSQL and how it was started."""

    route: str
    url: str
    port: int
    data_dir: Path
    pid: int
    root: Path | None = None


@dataclass(frozen=True)
class _Runner:
    """How one route runs the PostgreSQL binaries, and where they see the data directory."""

    route: str
    bin_dir: Path  # as the binaries see it
    major: str
    user: tuple[int, int] | None = None  # (uid, gid) to switch to; None runs as ourselves
    root: Path | None = None  # the chroot, if any
    mount: Path | None = None  # host path where the data directory is bind-mounted, if it is

    def visible(self, data_dir: Path) -> Path:
        """Return data_dir as the binaries see it."""
        if self.mount is None:
            return data_dir
        return Path("/") / self.mount.relative_to(self.root) if self.root else self.mount

    def command(self, *cmd: str) -> list[str]:
        """Return the command line running cmd as the postgres user (inside the root, if any)."""
        if self.root is not None:
            # Numeric ids: a user name would be looked up on the host, not in the root.
            return ["chroot", f"--userspec={self.user[0]}:{self.user[1]}", str(self.root), *cmd]
        if self.user is not None:
            return ["runuser", "-u", pwd.getpwuid(self.user[0]).pw_name, "--", *cmd]
        return list(cmd)

    def tool(self, name: str, *args: str) -> list[str]:
        return self.command(str(self.bin_dir / name), *args)

    def env(self) -> dict[str, str]:
        if self.root is not None:
            return dict(CHROOT_ENV)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "LC_ALL"}
        env["LANG"] = "C.UTF-8"
        return env


# --- pure helpers -----------------------------------------------------------


def build_url(port: int, host: str = "127.0.0.1", database: str = DATABASE) -> str:
    """Return the URL of the local server (trust auth, so no password)."""
    return f"postgresql://postgres@{host}:{port}/{database}"


def default_cache_dir() -> Path:
    """Return where the Debian 13 root is cached: $GOVDB_PG_ROOT_CACHE or ~/.cache/govdb/pg-root-trixie."""
    override = os.environ.get("GOVDB_PG_ROOT_CACHE", "").strip()
    if override:
        return Path(override).expanduser().absolute()
    return Path.home() / ".cache" / "govdb" / f"pg-root-{SUITE}"


def find_system_postgres(
    lib_root: Path = Path("/usr/lib/postgresql"), share_root: Path = Path("/usr/share/postgresql")
) -> tuple[Path, str] | None:
    """Return (bin dir, major version) of the newest installed PostgreSQL that has AGE, or None."""
    found: list[tuple[int, Path, str]] = []
    if not lib_root.is_dir():
        return None
    for version_dir in lib_root.iterdir():
        major = version_dir.name
        bin_dir = version_dir / "bin"
        if not major.isdigit():
            continue
        has_tools = all((bin_dir / tool).is_file() for tool in ("postgres", "initdb", "pg_ctl", "psql"))
        if has_tools and (share_root / major / "extension" / "age.control").is_file():
            found.append((int(major), bin_dir, major))
    if not found:
        return None
    _, bin_dir, major = max(found)
    return bin_dir, major


def root_is_valid(root: Path) -> bool:
    """Tell whether root is a complete Debian root with PostgreSQL 17, AGE and a postgres user."""
    return (
        (root / "usr/lib/postgresql" / PG_MAJOR / "bin/postgres").is_file()
        and (root / "usr/share/postgresql" / PG_MAJOR / "extension/age.control").is_file()
        and chroot_postgres_ids(root) is not None
    )


def chroot_postgres_ids(root: Path) -> tuple[int, int] | None:
    """Return the (uid, gid) of the postgres user in root's /etc/passwd, or None."""
    try:
        lines = (root / "etc/passwd").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == "postgres" and fields[2].isdigit() and fields[3].isdigit():
            return int(fields[2]), int(fields[3])
    return None


def parse_apt_candidate(policy_output: str) -> str | None:
    """Return the candidate version from `apt-cache policy` output, or None if there is none."""
    match = re.search(r"^\s*Candidate:\s*(\S+)", policy_output, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def mount_key(data_dir: Path) -> str:
    """Return the directory name under which data_dir is bind-mounted."""
    return hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]


def read_state(data_dir: Path) -> dict | None:
    """Return the state file of data_dir, or None if there is none."""
    path = data_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalPostgresError(f"cannot read {path} ({exc.strerror})") from None
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or state.get("route") not in ROUTES or type(state.get("port")) is not int:
            raise ValueError("no valid route and port")
    except ValueError as exc:
        raise LocalPostgresError(f"{path} is damaged ({exc}); stop any server by hand and remove the file") from None
    return state


def write_state(data_dir: Path, state: dict) -> None:
    """Write the state file of data_dir atomically."""
    tmp = data_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, data_dir / STATE_FILE)


def running_pid(cluster: Path) -> int | None:
    """Return the pid in cluster/postmaster.pid if it is a live server of this cluster, else None."""
    pid = _pidfile_pid(cluster)
    if pid is None or _is_zombie(pid):
        return None
    # The postmaster's working directory is its cluster; after a crash the pid may name another process.
    try:
        ours, theirs = cluster.stat(), os.stat(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return None
    except PermissionError:
        return pid if _comm(pid) in ("postgres", "postmaster") else None
    return pid if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino) else None


def _pidfile_pid(cluster: Path) -> int | None:
    try:
        return int((cluster / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- running commands -------------------------------------------------------


def _run(argv: list[str], what: str, *, env: dict | None = None, log_file: Path | None = None) -> str:
    """Run argv; on failure raise LocalPostgresError saying what failed, with the output's tail."""
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd="/",
                              stdin=subprocess.DEVNULL, timeout=900)
    except FileNotFoundError:
        raise LocalPostgresError(f"cannot {what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LocalPostgresError(f"cannot {what}: {argv[0]} did not finish in 15 minutes") from None
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()
        if log_file is not None and log_file.is_file():
            out += [f"--- last lines of {log_file}:", *_tail(log_file, 15)]
        detail = "\n".join(out[-25:])
        message = f"cannot {what} ({argv[0]} exited {proc.returncode})"
        raise LocalPostgresError(f"{message}:\n{detail}" if detail else message)
    return proc.stdout


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def _mounts_under(path: Path) -> list[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], check=False, capture_output=True, text=True).stdout
    top = str(path.resolve())
    # findmnt -r escapes blanks as \x20; the paths compared here have none.
    return [t for t in out.splitlines() if t == top or t.startswith(top.rstrip("/") + "/")]


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_path (creating its directory), so one start/stop/build runs at a time."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as exc:
        raise LocalPostgresError(f"cannot use {lock_path.parent} ({exc.strerror})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- routes -----------------------------------------------------------------


def _system_runner(data_dir: Path, bin_dir: Path, major: str, route: str) -> _Runner:
    if os.geteuid() != 0:
        return _Runner(route, bin_dir, major)
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise LocalPostgresError("there is no 'postgres' system user to run PostgreSQL as "
                                 "(reinstall the postgresql package)") from None
    runner = _Runner(route, bin_dir, major, user=(entry.pw_uid, entry.pw_gid))
    # A data directory under /root (say) is out of the postgres user's reach: mount it where it is not.
    reachable = subprocess.run(runner.command("test", "-x", str(data_dir.parent)), check=False, cwd="/").returncode == 0
    if reachable:
        return runner
    return _Runner(route, bin_dir, major, runner.user, mount=SYSTEM_MOUNTS / mount_key(data_dir))


def _chroot_runner(data_dir: Path, root: Path) -> _Runner:
    ids = chroot_postgres_ids(root)
    if ids is None:
        raise LocalPostgresError(f"{root}/etc/passwd has no postgres user")
    return _Runner("chroot", Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"), PG_MAJOR, ids, root,
                   root / CHROOT_MOUNTS / mount_key(data_dir))


def _runner_from_state(data_dir: Path, state: dict) -> _Runner:
    """Rebuild the runner a server was started with, to stop it."""
    if state.get("root"):
        return _chroot_runner(data_dir, Path(state["root"]))
    bin_dir = Path(state["bin_dir"])
    runner = _system_runner(data_dir, bin_dir, bin_dir.parent.name, state["route"])
    mount = Path(state["mount"]) if state.get("mount") else None
    return _Runner(runner.route, bin_dir, runner.major, runner.user, mount=mount)


def _apt_candidate(package: str) -> str | None:
    out = subprocess.run(["apt-cache", "policy", package], check=False, capture_output=True, text=True).stdout
    return parse_apt_candidate(out)


def _apt(log: Log, *args: str) -> None:
    log(f"govdb pg: apt-get {' '.join(args)}")
    _run(["apt-get", *args], f"run apt-get {args[0]}", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _choose_runner(data_dir: Path, state: dict | None, log: Log) -> _Runner:
    is_root = os.geteuid() == 0
    # A data directory keeps the route it was made with while that route still works.
    if state is not None and (data_dir / CLUSTER / "PG_VERSION").is_file():
        if state["route"] == "chroot" and is_root and state.get("root") and root_is_valid(Path(state["root"])):
            return _chroot_runner(data_dir, Path(state["root"]))
        bin_dir = Path(state.get("bin_dir") or "/nonexistent")
        if state["route"] in ("system", "apt") and (bin_dir / "postgres").is_file():
            return _system_runner(data_dir, bin_dir, bin_dir.parent.name, state["route"])

    system = find_system_postgres()
    if system is not None:
        return _system_runner(data_dir, *system, "system")
    if not is_root:
        raise LocalPostgresError(
            "found no PostgreSQL with Apache AGE; install PostgreSQL 17 and AGE 1.5 "
            "(Debian 13: sudo apt-get install postgresql-17 postgresql-17-age), "
            "or run govdb pg start as root to build a private Debian 13 root with debootstrap")
    if shutil.which("apt-get"):
        if _apt_candidate(PACKAGES[1]) is None and not any(Path("/var/lib/apt/lists").glob("*_Packages*")):
            _apt(log, "update")  # a fresh image has no package lists at all
        if _apt_candidate(PACKAGES[1]) is not None:
            _apt(log, "install", "-y", *PACKAGES)
            system = find_system_postgres()
            if system is None:
                raise LocalPostgresError(f"installed {' '.join(PACKAGES)} but found no age.control "
                                         "in /usr/share/postgresql")
            return _system_runner(data_dir, *system, "apt")
    return _chroot_runner(data_dir, ensure_root(default_cache_dir(), log))


def ensure_root(cache: Path, log: Log = print) -> Path:
    """Return a valid Debian 13 root with PostgreSQL 17 + AGE at cache, building it with debootstrap if needed."""
    if root_is_valid(cache):
        return cache
    with _locked(cache.parent / f".{cache.name}.lock"):
        if root_is_valid(cache):  # another process built it while we waited
            return cache
        if cache.exists():
            raise LocalPostgresError(f"{cache} is not a complete Debian root with PostgreSQL {PG_MAJOR} and AGE; "
                                     "remove it (after checking that nothing is mounted under it) and start again")
        if not shutil.which("debootstrap"):
            if not shutil.which("apt-get"):
                raise LocalPostgresError("debootstrap is not installed; install it, or PostgreSQL 17 with AGE 1.5")
            _apt(log, "update")
            _apt(log, "install", "-y", "--no-install-recommends", "debootstrap")
        for stale in cache.parent.glob(f".{cache.name}.build-*"):
            _remove_tree(stale)
        # Built under a temporary name and renamed, so an interrupted build is never taken for the cache.
        build = cache.parent / f".{cache.name}.build-{os.getpid()}"
        build_log = cache.parent / f"{cache.name}.build.log"
        mirror = os.environ.get("GOVDB_DEBIAN_MIRROR", "").strip() or DEFAULT_MIRROR
        log(f"govdb pg: building a Debian 13 root with PostgreSQL {PG_MAJOR} + AGE in {cache} "
            f"(once; about a minute and 700 MB; log in {build_log})")
        started = time.monotonic()
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(build), mirror]
        try:
            with open(build_log, "w") as out:
                code = subprocess.run(argv, check=False, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd="/").returncode
            if code != 0:
                tail = "\n".join(_tail(build_log, 15))
                raise LocalPostgresError(f"cannot build the Debian 13 root (debootstrap exited {code}; "
                                         f"log in {build_log}):\n{tail}")
            if not root_is_valid(build):
                raise LocalPostgresError(f"debootstrap finished but {build} lacks PostgreSQL {PG_MAJOR} or AGE")
            os.rename(build, cache)
        finally:
            if build.exists():
                _remove_tree(build)
        log(f"govdb pg: Debian 13 root ready in {time.monotonic() - started:.0f} s")
        return cache


def _remove_tree(path: Path) -> None:
    """Remove a build directory, but never through a mount an interrupted debootstrap left in it."""
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    if _mounts_under(path):
        raise LocalPostgresError(f"cannot remove {path}: something is still mounted under it (unmount it by hand)")
    shutil.rmtree(path, ignore_errors=True)


# --- mounts -----------------------------------------------------------------


def _mount(runner: _Runner, data_dir: Path) -> None:
    if runner.root is not None and not _is_mountpoint(runner.root / "proc"):
        _run(["mount", "-t", "proc", "proc", str(runner.root / "proc")], f"mount /proc in {runner.root}")
        # Says that govdb, not someone else, mounted it, so the last stop may unmount it.
        (runner.root / CHROOT_MOUNTS).mkdir(exist_ok=True)
        (runner.root / CHROOT_MOUNTS / PROC_MARKER).touch()
    if runner.mount is not None and not _is_mountpoint(runner.mount):
        runner.mount.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(data_dir), str(runner.mount)], f"bind-mount {data_dir} on {runner.mount}")


def _unmount(root: Path | None, mount: Path | None) -> None:
    if mount is not None and _is_mountpoint(mount):
        _run(["umount", str(mount)], f"unmount {mount}")
    if mount is not None:
        try:
            mount.rmdir()
        except OSError:
            pass
    marker = None if root is None else root / CHROOT_MOUNTS / PROC_MARKER
    # /proc stays while another data directory still runs from the same root.
    if marker is not None and marker.exists() and not _mounts_under(root / CHROOT_MOUNTS):
        if _is_mountpoint(root / "proc"):
            _run(["umount", str(root / "proc")], f"unmount /proc in {root}")
        marker.unlink(missing_ok=True)


# --- the cluster ------------------------------------------------------------


def _initdb(runner: _Runner, data_dir: Path, log: Log) -> None:
    cluster = data_dir / CLUSTER
    if (cluster / "PG_VERSION").is_file():
        found = (cluster / "PG_VERSION").read_text().strip()
        if found != runner.major:
            raise LocalPostgresError(f"{cluster} was made by PostgreSQL {found} but the {runner.route} route runs "
                                     f"PostgreSQL {runner.major}; choose another --data-dir or remove it")
        return
    if cluster.exists():
        raise LocalPostgresError(f"{cluster} exists but holds no cluster; remove it and start again")
    # initdb under a temporary name and rename, so an interrupted initdb is never taken for a cluster.
    tmp = f"{CLUSTER}.initdb-tmp"
    shutil.rmtree(data_dir / tmp, ignore_errors=True)
    log("govdb pg: creating the cluster (initdb)")
    _run(runner.tool("initdb", "-D", str(runner.visible(data_dir) / tmp), "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C.UTF-8"), "create the cluster (initdb)", env=runner.env())
    os.rename(data_dir / tmp, cluster)


def _clear_dead_postmaster(cluster: Path, log: Log) -> None:
    """Make a postmaster.pid left by a crash harmless; PostgreSQL would take its pid for a live server."""
    pid = _pidfile_pid(cluster)
    deadline = time.monotonic() + 15
    # A killed postmaster stays a zombie until its parent (often init) reaps it.
    while pid is not None and _is_zombie(pid):
        if time.monotonic() > deadline:
            raise LocalPostgresError(f"the killed postmaster (pid {pid}) of {cluster} has not been reaped "
                                     "by its parent; end that parent process, then start again")
        time.sleep(0.1)
    if pid is not None and running_pid(cluster) is None and Path(f"/proc/{pid}").exists():
        os.replace(cluster / "postmaster.pid", cluster / "postmaster.pid.stale")
        log(f"govdb pg: postmaster.pid named pid {pid}, since reused by another program; moved it aside")


def _pg_ctl_start(runner: _Runner, data_dir: Path, port: int) -> None:
    seen = runner.visible(data_dir)
    argv = runner.tool("pg_ctl", "-D", str(seen / CLUSTER), "-l", str(seen / LOG_FILE), "-w", "-t", "60",
                       "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k /tmp {SERVER_OPTIONS}".strip(), "start")
    for attempt in range(10):
        try:
            _run(argv, f"start PostgreSQL on 127.0.0.1:{port}", env=runner.env(), log_file=data_dir / LOG_FILE)
            return
        except LocalPostgresError:
            # After a kill -9 the old backends may hold the shared memory a moment longer.
            if attempt < 9 and "is still in use" in "\n".join(_tail(data_dir / LOG_FILE, 5)):
                time.sleep(1)
                continue
            raise


def _ensure_database(runner: _Runner, port: int) -> None:
    psql = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"]
    found = _run(runner.tool("psql", *psql, "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"),
                 "query the new server", env=runner.env())
    if found.strip() != "1":
        _run(runner.tool("psql", *psql, "-c", f"CREATE DATABASE {DATABASE}"), f"create database {DATABASE}",
             env=runner.env())


# --- the commands -----------------------------------------------------------


def start(data_dir: Path, *, port: int = DEFAULT_PORT, log: Log = print) -> LocalServer:
    """Start a local PostgreSQL 17 + AGE on 127.0.0.1:port with its cluster in data_dir."""
    if not 0 < port < 65536:
        raise LocalPostgresError(f"port must be in 1-65535, got {port}")
    data_dir = Path(data_dir).expanduser().resolve()
    with _locked(data_dir / LOCK_FILE):
        state = read_state(data_dir)
        pid = running_pid(data_dir / CLUSTER)
        if pid is not None and state is not None:
            if state["port"] != port:
                log(f"govdb pg: already running on port {state['port']}, not {port} (stop it to change the port)")
            log(f"govdb pg: already running ({state['route']} route, pid {pid}): {build_url(state['port'])}")
            root = Path(state["root"]) if state.get("root") else None
            return LocalServer(state["route"], build_url(state["port"]), state["port"], data_dir, pid, root)
        if pid is not None:
            raise LocalPostgresError(f"a PostgreSQL (pid {pid}) that govdb did not start runs on "
                                     f"{data_dir / CLUSTER}; stop it first")
        if not _port_free(port):
            raise LocalPostgresError(f"port {port} on 127.0.0.1 is in use by another program "
                                     "(choose another with --port)")

        runner = _choose_runner(data_dir, state, log)
        log(f"govdb pg: route {runner.route} ({f'root {runner.root}' if runner.root else runner.bin_dir})")
        # Written before mounting, so that stop can undo a start interrupted half-way.
        write_state(data_dir, {"route": runner.route, "port": port, "bin_dir": str(runner.bin_dir),
                               "root": str(runner.root) if runner.root else None,
                               "mount": str(runner.mount) if runner.mount else None,
                               "as_root": runner.user is not None})
        try:
            _mount(runner, data_dir)
            if runner.user is not None and data_dir.stat().st_uid != runner.user[0]:
                _run(["chown", "-R", f"{runner.user[0]}:{runner.user[1]}", str(data_dir)],
                     f"give {data_dir} to the postgres user")
            _initdb(runner, data_dir, log)
            _clear_dead_postmaster(data_dir / CLUSTER, log)
            _pg_ctl_start(runner, data_dir, port)
            _ensure_database(runner, port)
            pid = running_pid(data_dir / CLUSTER)
            if pid is None:
                raise LocalPostgresError(f"PostgreSQL started but exited again; see {data_dir / LOG_FILE}")
        except BaseException:
            if running_pid(data_dir / CLUSTER) is None:
                _unmount(runner.root, runner.mount)
            raise
        url_ = build_url(port)
        log(f"govdb pg: PostgreSQL {runner.major} + AGE running (pid {pid}, log {data_dir / LOG_FILE}): {url_}")
        return LocalServer(runner.route, url_, port, data_dir, pid, runner.root)


def stop(data_dir: Path) -> bool:
    """Stop the local PostgreSQL of data_dir and undo its mounts; return whether one was running."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        return False
    with _locked(data_dir / LOCK_FILE):
        state = read_state(data_dir)
        pid = running_pid(data_dir / CLUSTER)
        if state is None:
            if pid is not None:
                raise LocalPostgresError(f"a PostgreSQL (pid {pid}) that govdb did not start runs on "
                                         f"{data_dir / CLUSTER}")
            return False
        if state.get("as_root", bool(state.get("root"))) and os.geteuid() != 0:
            raise LocalPostgresError(f"the local PostgreSQL in {data_dir} was started by root; stop it as root")
        runner = _runner_from_state(data_dir, state)
        if pid is not None:
            seen = runner.visible(data_dir)
            _run(runner.tool("pg_ctl", "-D", str(seen / CLUSTER), "-m", "fast", "-w", "-t", "60", "stop"),
                 "stop PostgreSQL", env=runner.env(), log_file=data_dir / LOG_FILE)
        _unmount(runner.root, runner.mount)
        return pid is not None


def status(data_dir: Path) -> dict | None:
    """Return what is known of the local PostgreSQL of data_dir, or None if none was ever started there."""
    data_dir = Path(data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return None
    pid = running_pid(data_dir / CLUSTER)
    return {
        "running": pid is not None,
        "pid": pid,
        "route": state["route"],
        "port": state["port"],
        "url": build_url(state["port"]),
        "data_dir": str(data_dir),
        "root": state.get("root"),
        "log": str(data_dir / LOG_FILE),
    }


def url(data_dir: Path) -> str:
    """Return the URL of the running local PostgreSQL of data_dir."""
    data_dir = Path(data_dir).expanduser().resolve()
    info = status(data_dir)
    if info is None:
        raise LocalPostgresError(f"no local PostgreSQL was started in {data_dir} "
                                 f"(run govdb pg start --data-dir {data_dir})")
    if not info["running"]:
        raise LocalPostgresError(f"the local PostgreSQL in {data_dir} is not running "
                                 f"(run govdb pg start --data-dir {data_dir})")
    return info["url"]


def client_tool(name: str, major: str = PG_MAJOR) -> tuple[list[str], dict[str, str]] | None:
    """Return (argv, env) running PostgreSQL client tool ``name`` of version ``major`` from a local route, or None.

    Looks in /usr/lib/postgresql/MAJOR/bin, then in the cached Debian 13 root
    (root only), where the tool runs as the root's postgres user. Paths on the
    host are not visible in the root: give files to the tool as its stdin and
    stdout (open descriptors cross the chroot). The env holds no PG* variable
    of the host; add PGPASSWORD there, never a password on the command line.
    """
    if not re.fullmatch(r"[a-z_]+", name) or not major.isdigit():
        raise LocalPostgresError(f"not a PostgreSQL client tool: {name!r} {major!r}")
    system = Path("/usr/lib/postgresql") / major / "bin" / name
    if system.is_file():
        return [str(system)], _Runner("system", system.parent, major).env()
    root = default_cache_dir()
    if major != PG_MAJOR or os.geteuid() != 0 or not root_is_valid(root):
        return None
    runner = _Runner("chroot", Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"), PG_MAJOR, chroot_postgres_ids(root), root)
    return runner.tool(name), runner.env()
