"""``make server``: MLflow's own tracking server for a team, configured from the environment.

Nothing here serves a request: this module writes MLflow's basic-auth configuration and starts
``mlflow server`` with a PostgreSQL backend store, proxied artifacts (a folder or an
S3-compatible bucket) and the ``basic-auth`` app. Secrets come from the environment only:

    MLFLOW_BACKEND_STORE_URI        postgresql+psycopg2://user:password@host:5432/mlflow
    MLFLOW_AUTH_DATABASE_URI        users and permissions (default: the backend store's
                                    server, database ``<name>_auth``)
    MLFLOW_ARTIFACTS_DESTINATION    /srv/mlflow-artifacts or s3://bucket/prefix (S3: AWS_* and
                                    MLFLOW_S3_ENDPOINT_URL for a non-AWS endpoint)
    MLFLOW_AUTH_ADMIN_USERNAME      the first administrator (default admin)
    MLFLOW_AUTH_ADMIN_PASSWORD      its password, read on the first start only
    MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's sessions and CSRF tokens
    MLFLOW_SERVER_ALLOWED_HOSTS     the Host headers clients send (``mlflow-host:5000``): MLflow
                                    refuses other names with 403 "Invalid Host header" (it
                                    accepts localhost and private IPs by default; this machine's
                                    loopback names are always added)
    MLFLOW_SERVER_CORS_ALLOWED_ORIGINS  the UI's origins (``http://mlflow-host:5000``)
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's job runner for GenAI features (default here:
                                    false, eight fewer processes)
    FMNIST_AUTH_CACHE_TTL_SECONDS   how long a server worker trusts a checked user and password
                                    (default 60; 0 checks the hash on every request)

The default permission is NO_PERMISSIONS: a user reads and writes only the experiments the
creator or an administrator granted (``python -m fmnist_crnn.server grant``); the creator of an
experiment manages it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fmnist_crnn.errors import TrackingError

REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
            "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
DEFAULT_PERMISSION = "NO_PERMISSIONS"
MIN_ADMIN_PASSWORD = 12  # MLflow's basic-auth app refuses to start with a shorter one
# MLflow checks a request's password against its scrypt hash (~0.14 s of the server's CPU
# here) on every request unless its credential cache is on, and a tracked run makes many
# requests: against PostgreSQL + S3 with auth, a 2-epoch slice `dvc repro` waited 39 s
# for the server without the cache and 8 s with it (docs/team.md). The price: a password
# change or a deleted user reaches the *other* server workers only when their entry expires.
AUTH_CACHE_TTL_ENV = "FMNIST_AUTH_CACHE_TTL_SECONDS"
AUTH_CACHE_TTL_S = 60
LOOPBACK_HOSTS = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[::1]:*")


class ServerConfigError(RuntimeError):
    """A setting the server needs is missing or unusable."""


def auth_database_uri(backend_uri: str) -> str:
    """The backend store's server, database ``<name>_auth``: MLflow's user store keeps its own
    migration history, so it gets a database of its own."""
    parts = urlsplit(backend_uri)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}_auth"))


def auth_cache_ttl(env: dict[str, str]) -> int:
    """Seconds a worker caches a successful credential check (MLflow's auth_cache_ttl_seconds)."""
    raw = env.get(AUTH_CACHE_TTL_ENV, "").strip()
    if not raw:
        return AUTH_CACHE_TTL_S
    if not raw.isdigit():
        raise ServerConfigError(f"{AUTH_CACHE_TTL_ENV}={raw!r}: expected a whole number of "
                                "seconds, 0 to check the password on every request")
    return int(raw)


def auth_config(env: dict[str, str]) -> str:
    """The basic-auth INI file's text. The admin password stays in the environment."""
    database = env.get("MLFLOW_AUTH_DATABASE_URI") or auth_database_uri(
        env["MLFLOW_BACKEND_STORE_URI"])
    ttl = auth_cache_ttl(env)
    return "\n".join([
        "[mlflow]",
        f"default_permission = {DEFAULT_PERMISSION}",
        f"database_uri = {database}",
        f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME') or 'admin'}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        f"auth_cache_ttl_seconds = {ttl}",
        "",
    ])


def server_command(env: dict[str, str], host: str, port: int, workers: int,
                   config_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and environment; checks the settings first."""
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ServerConfigError(f"set {', '.join(missing)} in the environment (docs/team.md); "
                                "secrets never go in params.yaml or git")
    if len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) < MIN_ADMIN_PASSWORD:
        raise ServerConfigError(f"MLFLOW_AUTH_ADMIN_PASSWORD has "
                                f"{len(env['MLFLOW_AUTH_ADMIN_PASSWORD'])} characters; MLflow "
                                f"needs at least {MIN_ADMIN_PASSWORD}")
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    if backend.startswith("postgresql://"):
        raise ServerConfigError(
            "MLFLOW_BACKEND_STORE_URI: say postgresql+psycopg2://... (the pinned driver); a "
            "plain postgresql:// makes SQLAlchemy look for psycopg 3, which is not installed")
    text = auth_config(env)  # checks the cache setting before anything is written
    config_dir.mkdir(parents=True, exist_ok=True)
    ini = config_dir / "basic_auth.ini"
    ini.write_text(text)
    ini.chmod(0o600)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", backend,
               "--serve-artifacts", "--artifacts-destination",
               env["MLFLOW_ARTIFACTS_DESTINATION"],
               "--app-name", "basic-auth",
               "--host", host, "--port", str(port), "--workers", str(workers)]
    hosts = [h.strip() for h in env.get("MLFLOW_SERVER_ALLOWED_HOSTS", "").split(",")
             if h.strip()]
    if hosts:
        command += ["--allowed-hosts", ",".join([*hosts, *LOOPBACK_HOSTS])]
    elif host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: clients that name this machine by host name (not localhost or a "
              f"private IP) get 403 'Invalid Host header' unless MLFLOW_SERVER_ALLOWED_HOSTS "
              f"lists it (e.g. mlflow-host:{port})", file=sys.stderr)
    if env.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"):
        command += ["--cors-allowed-origins", env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"]]
    # MLflow 3's job runner (GenAI scorers and trace roll-ups, which this pipeline never
    # uses) starts eight more processes of ~275 MB each beside the server; set the variable to
    # true to keep it.
    jobs = env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return command, {**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fmnist_crnn.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start mlflow server (PostgreSQL, artifacts, auth)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--config-dir", type=Path, default=Path(".mlflow-server"),
                       help="where the generated basic_auth.ini goes")
    user = sub.add_parser("add-user", help="create a user (as an administrator)")
    user.add_argument("username")
    grant = sub.add_parser("grant", help="give a user READ/EDIT/MANAGE on an experiment")
    grant.add_argument("username")
    grant.add_argument("experiment", help="experiment name")
    grant.add_argument("--permission", default="READ",
                       choices=["READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"])
    args = p.parse_args(argv)
    try:
        if args.command == "serve":
            command, env = server_command(dict(os.environ), args.host, args.port,
                                          args.workers, args.config_dir)
            print(" ".join(command), flush=True)
            os.execve(command[0], command, env)  # noqa: S606 (replace this process)
        if args.command == "add-user":
            password = os.environ.get("FMNIST_NEW_USER_PASSWORD")
            if not password:
                raise ServerConfigError("set FMNIST_NEW_USER_PASSWORD to the new user's "
                                        "password (kept out of the shell history)")
            create_user(args.username, password)
        else:
            grant_experiment(args.username, args.experiment, args.permission)
        print("done")
    except (ServerConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# --- The server's users: MLflow's basic-auth client (this module, fmnist_crnn.tracking and
# fmnist_crnn.study.publish are the ones that import MLflow) -------------------------------

def _auth_client() -> Any:
    """MLflow's basic-auth client for the tracking server; the caller's credentials come from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    from mlflow.server import get_app_client

    from fmnist_crnn.tracking.store import tracking_uri

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(f"users and permissions live on a tracking server; "
                            f"MLFLOW_TRACKING_URI is {uri}")
    return get_app_client("basic-auth", tracking_uri=uri)


def create_user(username: str, password: str) -> None:
    _auth_client().create_user(username=username, password=password)


def grant_experiment(username: str, experiment_name: str, permission: str) -> None:
    """Give ``username`` ``permission`` on the experiment (replacing an earlier grant)."""
    import mlflow

    from fmnist_crnn.tracking.store import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(f"no experiment named '{experiment_name}' at {tracking_uri()}")
    _auth_client().grant_user_permission(username, "experiment", experiment.experiment_id,
                                         permission)


if __name__ == "__main__":
    main()
