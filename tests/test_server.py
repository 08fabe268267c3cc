"""`make server`'s launcher: settings from the environment, MLflow's own server started."""

import pytest

from fmnist_crnn import server

ENV = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:p@db:5432/mlflow",
       "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
       "MLFLOW_AUTH_ADMIN_PASSWORD": "secret-password",
       "MLFLOW_FLASK_SERVER_SECRET_KEY": "key"}


def test_the_command_is_mlflow_server_with_auth_postgres_and_proxied_artifacts(tmp_path):
    command, env = server.server_command(ENV, "127.0.0.1", 5000, 2, tmp_path)
    assert command[1:4] == ["-m", "mlflow", "server"]
    assert command[command.index("--backend-store-uri") + 1] == ENV["MLFLOW_BACKEND_STORE_URI"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert "--serve-artifacts" in command
    ini = (tmp_path / "basic_auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in ini  # nobody reads what was not granted
    assert "database_uri = postgresql+psycopg2://u:p@db:5432/mlflow_auth" in ini
    assert "secret-password" not in ini  # the password stays in the environment
    assert (tmp_path / "basic_auth.ini").stat().st_mode & 0o077 == 0
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "basic_auth.ini")


@pytest.mark.parametrize("missing", sorted(server.REQUIRED))
def test_a_missing_setting_is_named(tmp_path, missing):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(server.ServerConfigError, match=missing):
        server.server_command(env, "127.0.0.1", 5000, 2, tmp_path)


def test_a_plain_postgresql_uri_is_refused_with_the_fix(tmp_path):
    env = {**ENV, "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db/mlflow"}
    with pytest.raises(server.ServerConfigError, match=r"postgresql\+psycopg2://"):
        server.server_command(env, "127.0.0.1", 5000, 2, tmp_path)


def test_a_short_admin_password_is_refused_up_front_with_the_rule(tmp_path):
    env = {**ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"}
    with pytest.raises(server.ServerConfigError, match="has 8 characters.*at least 12"):
        server.server_command(env, "127.0.0.1", 5000, 2, tmp_path)
    assert not (tmp_path / "basic_auth.ini").exists()  # nothing written


def test_a_worker_caches_a_checked_password_for_a_minute_unless_told_otherwise(tmp_path):
    server.server_command(ENV, "127.0.0.1", 5000, 2, tmp_path / "default")
    assert "auth_cache_ttl_seconds = 60" in (tmp_path / "default/basic_auth.ini").read_text()
    env = {**ENV, "FMNIST_AUTH_CACHE_TTL_SECONDS": "0"}
    server.server_command(env, "127.0.0.1", 5000, 2, tmp_path / "off")
    assert "auth_cache_ttl_seconds = 0" in (tmp_path / "off/basic_auth.ini").read_text()


def test_a_bad_cache_setting_is_named_and_nothing_is_written(tmp_path):
    env = {**ENV, "FMNIST_AUTH_CACHE_TTL_SECONDS": "1m"}
    with pytest.raises(server.ServerConfigError,
                       match="FMNIST_AUTH_CACHE_TTL_SECONDS='1m': expected a whole number"):
        server.server_command(env, "127.0.0.1", 5000, 2, tmp_path / "config")
    assert not (tmp_path / "config").exists()


def test_allowed_hosts_and_origins_come_from_the_environment(tmp_path):
    env = {**ENV, "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow-host:5000, mlflow-host",
           "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "http://mlflow-host:5000"}
    command, _ = server.server_command(env, "0.0.0.0", 5000, 2, tmp_path)  # noqa: S104
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert hosts[:2] == ["mlflow-host:5000", "mlflow-host"] and "127.0.0.1:*" in hosts
    assert command[command.index("--cors-allowed-origins") + 1] == "http://mlflow-host:5000"


def test_a_public_bind_without_allowed_hosts_says_what_clients_will_meet(tmp_path, capsys):
    command, _ = server.server_command(ENV, "0.0.0.0", 5000, 2, tmp_path)  # noqa: S104
    assert "--allowed-hosts" not in command
    assert "MLFLOW_SERVER_ALLOWED_HOSTS" in capsys.readouterr().err
