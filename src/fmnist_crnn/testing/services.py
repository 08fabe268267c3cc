"""Real services started on loopback, for the tests and the benchmarks: PostgreSQL (Debian's
package; as the `postgres` user when run as root, since initdb refuses root), an S3-compatible
server (moto's server mode), `mlflow server` and a Dask scheduler with workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceUnavailable(RuntimeError):
    """A service's program is not installed here (the tests skip, or fail in CI)."""


def need(what: str, available: bool) -> None:
    if not available:
        raise ServiceUnavailable(f"{what} is not installed (CI installs it: .ci/run)")


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:  # initdb and pg_ctl refuse to run as root
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), "runuser")
        return [runuser, "-u", "postgres", "--", *cmd]
    return cmd


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields the superuser's URI without a database name."""
    need("PostgreSQL (Debian package postgresql)", bool(PG_BIN))
    bin_dir = PG_BIN[-1].parent
    root = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    root.chmod(0o755)  # the postgres user must reach its data folder
    data, sockets = root / "data", root / "sock"
    for folder in (data, sockets):
        folder.mkdir()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    password = "pg-test-password"  # noqa: S105 (a throwaway cluster on loopback)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]),
                   check=True, capture_output=True)
    log = root / "server.log"
    if os.geteuid() == 0:
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    subprocess.run(_as_postgres([
        str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start",
        "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"]),
        check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                     "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_uri: str, name: str) -> str:
    import psycopg2

    dsn = server_uri.replace("postgresql+psycopg2://", "postgresql://") + "/postgres"
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return f"{server_uri}/{name}"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on loopback; yields its endpoint URL."""
    need("moto[server]", _importable("moto.server"))
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_aws()).create_bucket(Bucket=name)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_aws())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _aws() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module.split(".")[0]) is not None


@contextlib.contextmanager
def mlflow_server(env: dict[str, str], workdir: Path) -> Iterator[str]:
    """`make server`'s launcher (python -m fmnist_crnn.server serve) on a free port."""
    port = free_port()
    log_path = workdir / "mlflow-server.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_crnn.server", "serve", "--port",
                             str(port), "--workers", "2", "--config-dir",
                             str(workdir / "server-config")],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def stranger_base_env() -> dict[str, str]:
    """This process's environment less tracking, DVC and project variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_", "AWS_"))}


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(log.read_text()[-4000:])
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 (http on loopback)
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer") from None
            time.sleep(0.5)


class PlainMlflowServer:
    """`mlflow server` on SQLite (or ``backend``, e.g. a PostgreSQL URI) with proxied
    artifacts, on a fixed port, that a test can stop and start again (the store and the
    artifacts survive, as on a restarted team server)."""

    def __init__(self, workdir: Path, env: dict[str, str], backend: str | None = None) -> None:
        # As `make server` (fmnist_crnn.server): without MLflow's job runner, eight processes
        # the pipeline never uses.
        self.workdir = workdir
        self.backend = backend or f"sqlite:///{workdir / 'server.db'}"
        self.env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the server's process without waiting for it (``wait_ready`` does): a
        fixture can set up other things while MLflow imports."""
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 self.backend, "--serve-artifacts",
                 "--artifacts-destination", str(self.workdir / "server-artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self) -> None:
        wait_for_http(f"{self.url}/health", self.proc, self.log_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None


class DaskCluster:
    """`dask scheduler` and `dask worker` processes on loopback, each worker with its own
    environment (MLflow URI, work folder) as on separate machines."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.dask = str(Path(sys.executable).parent / "dask")

    def _start(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([self.dask, *args], cwd=self.workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_scheduler(self, env: dict[str, str]) -> None:
        self._start(["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                     "--no-dashboard"], env, "scheduler")

    def start_worker(self, env: dict[str, str], name: str) -> subprocess.Popen:
        return self._start(["worker", self.address, "--nworkers", "1", "--nthreads", "1",
                            "--name", name, "--host", "127.0.0.1", "--no-dashboard"],
                           env, name)

    def wait_for_workers(self, n: int, limit_s: float = 120) -> dict[str, int]:
        """Worker address -> pid of its worker process, once ``n`` are connected."""
        from distributed import Client

        deadline = time.monotonic() + limit_s
        with Client(self.address, timeout="60s") as client:
            while len(client.scheduler_info()["workers"]) < n:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{n} dask workers did not connect")
                time.sleep(0.5)
            return client.run(os.getpid)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
