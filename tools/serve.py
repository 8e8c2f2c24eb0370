"""Start a real tritonserver on a model repository, with the `tritium` backend laid out beside the Python one.

    python -m tools.serve --model-repository model_repo                  # ports 8000 (HTTP), 8001 (gRPC), 8002
    python -m tools.serve --generate --model-repository model_repo       # generate the bundled SmolLM2 first
    python -m tools.serve --model-repository model_repo -- --log-verbose=1   # extra tritonserver flags

The binary comes from $TRITONSERVER_ROOT or the installed nvidia-pytriton wheel (pytriton/tritonserver).
Admin APIs (model repository, model config, shared memory, statistics, trace, logging) are restricted by
default on HTTP and gRPC: they need the header `admin-key: <key>` (the key from --admin-key or
$TRITIUM_ADMIN_KEY, else random and printed). See docs/SECURITY.md.
SIGTERM/SIGINT are forwarded to tritonserver, which shuts the engine down cleanly.
A Python backend stub that dies (killed, out of memory) is not restarted by tritonserver 2.51: its in-flight
requests hang and later ones fail while the server still reports ready. The launcher watches the stubs and
restarts tritonserver when one dies (--no-restart-on-stub-death: exit 3 instead, for an orchestrator).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND_MODEL = ROOT / "backend" / "model.py"
# Every admin API of tritonserver 2.51. perf_analyzer reads model-config and statistics: benchmarks pass
# BENCHMARK_RESTRICTED (or send the header with perf_analyzer -H).
DEFAULT_RESTRICTED = "model-repository,model-config,shared-memory,statistics,trace,logging"
BENCHMARK_RESTRICTED = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "admin-key"
EXIT_TIMEOUT_S = 15
# tritonserver 2.51 can hang forever in its gRPC server's destructor once the exit timeout has expired (seen
# when a streaming client vanished without closing its stream: the ensemble never unloads). After SIGTERM
# we give it the exit timeout plus this grace, then SIGKILL; the Python stubs notice and exit on their own.
KILL_GRACE_S = 15
STUB_NAME = "triton_python_backend_stub"
STUB_POLL_S = 1.0
EXIT_STUB_DIED = 3


def find_tritonserver_root() -> Path:
    """$TRITONSERVER_ROOT, else the tritonserver shipped in the nvidia-pytriton wheel."""
    env = os.environ.get("TRITONSERVER_ROOT")
    if env:
        root = Path(env)
    else:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("tritonserver not found: set TRITONSERVER_ROOT or pip install nvidia-pytriton==0.7.0")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"{root}: no bin/tritonserver there")
    return root


def python_stub(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (root / "python_backend_stubs" / version / "triton_python_backend_stub",
                      root / "backends" / "python" / "triton_python_backend_stub"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no Python backend stub for Python {version}")


def layout_backend_dir(root: Path, dest: Path) -> Path:
    """dest/python = the Python backend (+ the stub for this Python); dest/tritium/model.py = our backend."""
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file() and (f.suffix in (".so", ".py") or f.name == "triton_python_backend_stub"):
            shutil.copy2(f, python_dir / f.name)
    shutil.copy2(python_stub(root), python_dir / "triton_python_backend_stub")
    tritium_dir = dest / "tritium"
    tritium_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BACKEND_MODEL, tritium_dir / "model.py")
    return dest


def server_env(root: Path, base: dict | None = None) -> dict[str, str]:
    """The stub embeds libpython and finds packages through the first python3 on PATH: the venv's."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [str(p) for p in (root.parent.parent / "nvidia_pytriton.libs", root.parent / "nvidia_pytriton.libs")
            if p.is_dir()]
    libpython = python_libdir()
    if libpython:
        libs.insert(0, libpython)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def python_libdir() -> str | None:
    """The directory of the running Python's libpython, when it is a shared library.

    The stub links libpython3.X.so.1.0 and would otherwise find the system's (Debian's 3.11.2 here), whose
    ABI differs from the running Python's extension modules (pyenv 3.11.7's _ssl needs _PyModule_Add)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    return libdir if libdir and (Path(libdir) / name).is_file() else None


def build_command(root: Path, repo: Path, backend_dir: Path, http_port: int = 8000, grpc_port: int = 8001,
                  metrics_port: int = 8002, restricted: str = DEFAULT_RESTRICTED, admin_key: str = "",
                  extra: list[str] | None = None, exit_timeout: int = EXIT_TIMEOUT_S) -> list[str]:
    cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backend_dir}",
           "--model-control-mode=none", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
           f"--metrics-port={metrics_port}", "--allow-metrics=true", f"--exit-timeout-secs={exit_timeout}"]
    if restricted:
        cmd += [f"--http-restricted-api={restricted}:{ADMIN_HEADER}={admin_key}",
                f"--grpc-restricted-protocol={restricted}:{ADMIN_HEADER}={admin_key}"]
    return cmd + list(extra or [])


def numpy_warning() -> str | None:
    """The stub (python backend r24.10) needs numpy 1.x: with numpy 2.x every BYTES input reaches the model
    corrupted (its length prefix read as the first byte repeated; seen with 2.4.6 and 2.5 on the GPU machine,
    and with 2.5.5 here; 1.26.4 works), so text_input fails in preprocessing."""
    try:
        import numpy
    except ImportError:
        return None
    if int(numpy.__version__.split(".")[0]) >= 2:
        return (f"warning: numpy {numpy.__version__} is first on this Python's path; tritonserver 2.51's Python "
                "backend stub mishandles BYTES tensors with numpy 2.x. Install numpy<2 (pip install 'numpy<2') "
                "or put a numpy 1.26 ahead on PYTHONPATH.")
    return None


def is_ready(http_url: str) -> bool:
    """GET /v2/health/ready answers 200 (any error, refused connection or other status: not yet)."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class TritonServer:
    """A tritonserver child process; a context manager that waits for readiness and stops it on exit."""

    def __init__(self, repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 restricted: str = DEFAULT_RESTRICTED, admin_key: str | None = None, extra: list[str] | None = None,
                 log_path: str | Path | None = None, exit_timeout: int = EXIT_TIMEOUT_S):
        self.root = find_tritonserver_root()
        self.repo = Path(repo).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.admin_key = admin_key or secrets.token_urlsafe(16)
        self._workdir = Path(tempfile.mkdtemp(prefix="tritium-backends-"))
        self.backend_dir = layout_backend_dir(self.root, self._workdir)
        self.exit_timeout = exit_timeout
        self.command = build_command(self.root, self.repo, self.backend_dir, http_port, grpc_port, metrics_port,
                                     restricted, self.admin_key, extra, exit_timeout)
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def start(self) -> "TritonServer":
        warning = numpy_warning()
        if warning:
            print(warning, file=sys.stderr)
        log = open(self.log_path, "wb") if self.log_path else None
        # Its own process group, so that stubs it leaves behind (when it is killed) can be killed with it.
        self.process = subprocess.Popen(self.command, env=server_env(self.root), stdout=log, stderr=subprocess.STDOUT
                                        if log else None, start_new_session=True)
        self.stub_died = threading.Event()
        self._stopping = False
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if is_ready(f"http://localhost:{self.http_port}"):
                self._watch_stubs()
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds (default: the exit timeout plus KILL_GRACE_S);
        returns the exit code."""
        timeout = self.exit_timeout + KILL_GRACE_S if timeout is None else timeout
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            kill_process_group(self.process.pid)
        shutil.rmtree(self._workdir, ignore_errors=True)
        return self.process.returncode if self.process else None

    def stub_pids(self) -> dict[int, str]:
        """The live Python backend stubs of this server: pid -> model instance name (e.g. llm_0_0)."""
        return {pid: name for pid, (name, state) in stub_processes(self.process.pid).items() if state != "Z"}

    def _watch_stubs(self) -> None:
        """From readiness on, a stub that dies while the server is not stopping sets `stub_died` and stops
        tritonserver (bounded), so that hung requests end in errors and health checks fail."""
        watched = self.stub_pids()
        thread = threading.Thread(target=self._watch_loop, args=(watched,), name="stub-watchdog", daemon=True)
        thread.start()

    def _watch_loop(self, watched: dict[int, str]) -> None:
        while not self._stopping and self.process.poll() is None:
            time.sleep(STUB_POLL_S)
            dead = sorted(set(watched) - set(self.stub_pids()))
            if dead and not self._stopping:
                print(f"tritium: the Python backend stub of {', '.join(watched[p] for p in dead)} died; tritonserver "
                      "2.51 does not restart it (its requests would hang): stopping tritonserver", file=sys.stderr)
                self.stub_died.set()
                self.stop()
                return

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stub_processes(server_pid: int) -> dict[int, tuple[str, str]]:
    """Children of server_pid that are Python backend stubs: pid -> (model instance name, process state).
    Read from /proc (Linux), so the launcher needs no extra package."""
    stubs = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
            cmdline = (stat_path.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == server_pid and cmdline and cmdline[0].endswith(STUB_NAME.encode()):
            stubs[int(stat_path.parent.name)] = (_instance_name(cmdline), state)
    return stubs


def _instance_name(cmdline: list[bytes]) -> str:
    """The stub's arguments: model.py path, shm region, sizes, parent pid, backend dir, ipc size, instance name."""
    return cmdline[8].decode(errors="replace") if len(cmdline) > 8 else "?"


def kill_process_group(pgid: int) -> None:
    """SIGKILL what is left of tritonserver's process group (stubs it did not stop); nothing if it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repo", help="the generated repository (default: model_repo)")
    parser.add_argument("--generate", action="store_true",
                        help="first generate the repository for the bundled SmolLM2 (if it does not exist yet)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--restricted-apis", default=DEFAULT_RESTRICTED,
                        help=f"APIs that need the admin key (default: {DEFAULT_RESTRICTED}; '' restricts none)")
    parser.add_argument("--exit-timeout-secs", type=int, default=EXIT_TIMEOUT_S,
                        help="after SIGTERM, how long in-flight requests may finish (tritonserver's drain); "
                             f"the launcher kills tritonserver {KILL_GRACE_S} s after that")
    parser.add_argument("--restart-on-stub-death", action=argparse.BooleanOptionalAction, default=True,
                        help="restart tritonserver when a Python backend stub dies (tritonserver 2.51 does not "
                             f"restart it); --no-restart-on-stub-death exits with code {EXIT_STUB_DIED} instead")
    parser.add_argument("--admin-key", default=os.environ.get("TRITIUM_ADMIN_KEY"),
                        help="value of the admin-key header for restricted APIs (default: random, printed)")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    repo = Path(args.model_repository)
    if args.generate and not (repo / "ensemble" / "config.pbtxt").is_file():
        from tools.generate_repo import main as generate
        if generate(["--output-dir", str(repo)]) != 0:
            return 1
    if not repo.is_dir():
        print(f"error: --model-repository {repo} does not exist (generate it: python -m tools.generate_repo "
              f"--output-dir {repo}, or add --generate)", file=sys.stderr)
        return 2
    while True:
        server = TritonServer(repo, args.http_port, args.grpc_port, args.metrics_port, args.restricted_apis,
                              args.admin_key, extra, exit_timeout=args.exit_timeout_secs)
        if args.restricted_apis and not args.admin_key:
            args.admin_key = server.admin_key  # the same key across restarts
            print(f"restricted APIs ({args.restricted_apis}) need the header '{ADMIN_HEADER}: {server.admin_key}'",
                  file=sys.stderr)
        code = run_until_exit(server, args.exit_timeout_secs)
        if not server.stub_died.is_set():
            return code
        if not args.restart_on_stub_death:
            return EXIT_STUB_DIED
        print("tritium: restarting tritonserver", file=sys.stderr)


def run_until_exit(server: TritonServer, exit_timeout: int) -> int:
    """Starts tritonserver, forwards SIGTERM/SIGINT to it (SIGKILL KILL_GRACE_S after the exit timeout) and
    waits; the stub watchdog runs once it is ready."""
    server.start()
    killer = threading.Timer(exit_timeout + KILL_GRACE_S, server.process.kill)
    killer.daemon = True

    def forward(signum, frame) -> None:
        server._stopping = True  # a shutdown, not a stub death: the watchdog stands down
        server.process.send_signal(signum)
        if killer.ident is None:  # the first signal starts the kill timer
            killer.start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        server.wait_ready(timeout=float("inf"))
    except (RuntimeError, TimeoutError):
        pass  # it exited before it was ready (or was stopped): its exit code tells
    code = server.process.wait()
    killer.cancel()
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
