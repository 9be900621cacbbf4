"""Nobody in without credentials: a Ray head with token authentication and an MLflow server
with its own authentication (basic-auth app), both real processes on loopback, and every
way in tried without the credentials, with wrong ones and with too few permissions.

The accounts are those docs/guide/security.md sets up: the admin owns the experiment and the
registered models; the training service account may write runs and register versions of
``NAME`` (and move its ``@candidate``); a reader may only read and load; ``NAME-production``
(and its ``@production``) only the admin changes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from cvaa import tracking
from mlflowserver import ADMIN, MlflowServer, credentials
from secretscan import leaks, read_all

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PW = "admin-PLANTED-" + secrets.token_hex(8)
TRAINER, TRAINER_PW = "cvaa-train", "train-PLANTED-" + secrets.token_hex(8)
READER, READER_PW = "cvaa-reader", "read-PLANTED-" + secrets.token_hex(8)
NAME = "auth-gan"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The authenticated server, its experiment and registered models made by the admin,
    the training and reader accounts granted what the guide grants."""
    work = tmp_path_factory.mktemp("mlflow-auth")
    server = MlflowServer(work, str(work / "artifacts"), admin_password=ADMIN_PW).start()
    try:
        with credentials(ADMIN, ADMIN_PW):
            client = mlflow.MlflowClient(server.uri)
            experiment = client.create_experiment(tracking.EXPERIMENT)
            client.create_registered_model(NAME)
            client.create_registered_model(f"{NAME}-production")
        server.add_user(TRAINER, TRAINER_PW, {("experiment", experiment): "EDIT",
                                              ("registered_model", NAME): "EDIT"})
        server.add_user(READER, READER_PW, {("experiment", experiment): "READ",
                                            ("registered_model", NAME): "READ",
                                            ("registered_model", f"{NAME}-production"): "READ"})
        server.experiment_id = experiment
        yield server
    finally:
        server.stop()


def _refused(attempt) -> str:
    """The MLflow error code ``attempt()`` ends with ("ALLOWED" if it succeeds)."""
    try:
        attempt()
    except MlflowException as exc:
        return exc.error_code
    return "ALLOWED"


def _http(url: str, *, data: dict | None = None, token: str | None = None) -> int:
    """The status of one raw HTTP request (a script's way in, no client library)."""
    request = urllib.request.Request(
        url, data=json.dumps(data).encode() if data is not None else None,
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_refuses_every_request_without_credentials(auth_server, tmp_path):
    uri = auth_server.uri
    with credentials(TRAINER, TRAINER_PW):
        trainer = mlflow.MlflowClient(uri)
        run = trainer.create_run(auth_server.experiment_id, run_name="auth-probe")
        run_id = run.info.run_id
        trainer.log_metric(run_id, "loss", 1.0, step=1)
        version = trainer.create_model_version(NAME, f"{run.info.artifact_uri}/model",
                                               run_id=run_id).version
        trainer.set_registered_model_alias(NAME, "candidate", version)

    def attempts(client):
        return {
            "read the run": lambda: client.get_run(run_id),
            "search the runs": lambda: client.search_runs([auth_server.experiment_id]),
            "log a metric": lambda: client.log_metric(run_id, "loss", 9.0, step=2),
            "register a version": lambda: client.create_model_version(
                NAME, f"{run.info.artifact_uri}/model", run_id=run_id),
            "set an alias": lambda: client.set_registered_model_alias(NAME, "production",
                                                                      version),
            "look an alias up": lambda: client.get_model_version_by_alias(NAME, "candidate"),
        }

    outcomes = {}
    for who, user, password in [("no credentials", None, None),
                                ("a wrong password", TRAINER, "not-" + TRAINER_PW),
                                ("an unknown user", "intruder", TRAINER_PW)]:
        with credentials(user, password):
            client = mlflow.MlflowClient(uri)
            for what, attempt in attempts(client).items():
                outcomes[f"{who}: {what}"] = _refused(attempt)
    # the same, as a script would send it, without MLflow's client
    outcomes["raw POST runs/create"] = _http(f"{uri}/api/2.0/mlflow/runs/create",
                                             data={"experiment_id": auth_server.experiment_id})
    outcomes["raw GET runs/get"] = _http(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}")
    outcomes["raw artifact download"] = _http(
        f"{uri}/api/2.0/mlflow-artifacts/artifacts/{auth_server.experiment_id}")
    print(f"{len(outcomes)} unauthenticated attempts: "
          + ", ".join(sorted(set(map(str, outcomes.values())))))
    accepted = {k: v for k, v in outcomes.items() if v not in ("UNAUTHENTICATED", 401)}
    assert not accepted, accepted

    # a reader reads, and changes nothing; the trainer cannot touch the production model
    with credentials(READER, READER_PW):
        reader = mlflow.MlflowClient(uri)
        assert reader.get_run(run_id).data.metrics == {"loss": 1.0}
        assert reader.get_model_version_by_alias(NAME, "candidate").version == version
        denied = {what: _refused(attempt) for what, attempt in attempts(reader).items()
                  if what in ("log a metric", "register a version", "set an alias")}
    with credentials(ADMIN, ADMIN_PW):
        admin = mlflow.MlflowClient(uri)
        promoted = admin.copy_model_version(f"models:/{NAME}/{version}", f"{NAME}-production")
        admin.set_registered_model_alias(f"{NAME}-production", "production",
                                         promoted.version)
    with credentials(TRAINER, TRAINER_PW):
        trainer = mlflow.MlflowClient(uri)
        denied["trainer moves @production"] = _refused(
            lambda: trainer.set_registered_model_alias(f"{NAME}-production", "production",
                                                       promoted.version))
        # (MLflow's client reports this 403 inside an INTERNAL_ERROR of its own)
        with pytest.raises(MlflowException, match="error code 403"):
            trainer.copy_model_version(f"models:/{NAME}/{version}", f"{NAME}-production")
    assert set(denied.values()) == {"PERMISSION_DENIED"}, denied

    # nothing the refused attempts tried took effect
    with credentials(ADMIN, ADMIN_PW):
        admin = mlflow.MlflowClient(uri)
        assert [m.value for m in admin.get_metric_history(run_id, "loss")] == [1.0]
        assert [v.version for v in admin.search_model_versions(f"name='{NAME}'")] == [version]
        assert admin.get_registered_model(NAME).aliases == {"candidate": version}
        production = admin.get_registered_model(f"{NAME}-production")
        assert production.aliases == {"production": promoted.version}


def test_refused_credentials_stop_the_spool_at_once_naming_the_variables(auth_server):
    from cvaa.tracking.spool import SpooledRun

    with credentials(TRAINER, TRAINER_PW):
        run_id = mlflow.MlflowClient(auth_server.uri).create_run(
            auth_server.experiment_id, run_name="spool-refused").info.run_id
    for user, password, code in [(TRAINER, "not-" + TRAINER_PW, "HTTP 401"),
                                 (READER, READER_PW, "HTTP 403")]:
        lines: list[str] = []
        with credentials(user, password):
            spool = SpooledRun(auth_server.uri, run_id, on_state=lines.append)
            spool.log_metrics({"loss": 0.5}, step=1)
            spool.log_metrics({"loss": 0.4}, step=2)
            start = time.monotonic()
            assert spool.flush(60) is False       # refused: no wait for a server to return
            waited = time.monotonic() - start
            spool.close()
        print(f"{code}: refused after {spool.failures} send, flush returned in "
              f"{waited:.1f} s")
        assert spool.refused and spool.failures == 1      # one try, no retry loop
        assert len(lines) == 1 and code in lines[0]
        assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
        assert spool.pending() == 2                        # kept, for a replay once fixed
    with credentials(ADMIN, ADMIN_PW):
        assert mlflow.MlflowClient(auth_server.uri).get_run(run_id).data.metrics == {}


def test_wrong_credentials_stop_a_job_in_one_line(auth_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": TRAINER,
           "MLFLOW_TRACKING_PASSWORD": "not-" + TRAINER_PW, "CVAA_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--mlflow-uri",
                           auth_server.uri, "--epochs", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert auth_server.uri in errors[0] and "HTTP 401" in errors[0]
    assert "MLFLOW_TRACKING_PASSWORD" in errors[0]
    assert not proc.stdout.strip()                 # it stopped before starting anything
    assert not (tmp_path / "ray_results").exists()


# ------------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.slow
def test_nodes_without_the_credentials_stop_the_run_after_its_first_epoch(
        auth_server, prepared_cpu, tmp_path, monkeypatch):
    """The driver has the training account, the nodes do not (the session's Ray workers
    were started without it, as nodes whose cluster.env lacks it): rank 0's first log is
    refused; every rank stops after that epoch with its checkpoint written; one readable
    error, no worker restart, the MLflow run left to resume."""
    from cvaa.config import load_config
    from cvaa.distributed.training import TrainJob, run_training

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", TRAINER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TRAINER_PW)
    cfg = load_config("cpu", overrides=["train.batch_size=2", "train.cpus_per_worker=1",
                                        "train.epochs=3"])
    job = TrainJob(cfg=cfg, data=prepared_cpu, run_name="nodes-without-credentials",
                   storage=str(tmp_path / "ray"), mlflow_uri=auth_server.uri,
                   register_name=NAME, preset="cpu")
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(tracking.TrackingAuthError) as raised:
        run_training(job, log=lines.append)
    message = str(raised.value)
    print(f"stopped after {time.monotonic() - start:.0f} s: {message}")
    assert "HTTP 401" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "\n" not in message and "epoch_0001" in message       # one line, where to resume
    assert not any("worker failure" in line for line in lines), lines   # no restart loop
    checkpoints = sorted(p.name for p in (tmp_path / "ray").rglob("epoch_*") if p.is_dir())
    assert checkpoints == ["epoch_0001"], checkpoints
    client = mlflow.MlflowClient(auth_server.uri)
    [run] = client.search_runs([auth_server.experiment_id],
                               "tags.`mlflow.runName` = 'nodes-without-credentials'")
    assert run.info.status == "RUNNING"       # resumable under the same --run-name


def _ray_init(port: int, env: dict[str, str]) -> subprocess.Popen:
    """``ray.init(address=...)`` in a fresh process: it prints CONNECTED or REFUSED."""
    code = ("import ray, sys\n"
            "try:\n"
            f"    ray.init(address='127.0.0.1:{port}', log_to_driver=False)\n"
            "except Exception as exc:\n"
            "    print('REFUSED', type(exc).__name__); sys.exit(1)\n"
            "print('CONNECTED', ray.cluster_resources().get('CPU'))\n")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _ray_cli(cmd: list[str], env: dict[str, str]) -> tuple[str, str]:
    """Run a Ray CLI command that should be refused: ("refused" or "ACCEPTED", output).
    A connection that fails outright (seen under heavy load) is tried again: only an
    answer of the dashboard's tells whether it lets the command in."""
    for _ in range(5):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        if "Failed to connect to Ray at address" not in output:
            break
        time.sleep(3)
    return ("refused" if proc.returncode != 0 else "ACCEPTED"), output


@pytest.mark.ray
@pytest.mark.slow
def test_a_token_cluster_refuses_strangers_and_trains_for_its_users(
        auth_server, prepared_cpu, tmp_path):
    """The Jobs CLI, the Jobs REST API and ``ray.init`` without the token (or with a wrong
    one) are refused; with it, ``jobs/train.py`` trains on the cluster and registers into
    the authenticated MLflow server under the training account; the reader loads the
    version and cannot move its alias; no credential reaches any output."""
    from rayhead import free_port, local_head, ray_env, submit

    token = secrets.token_hex(32)
    token_file = tmp_path / "ray_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # The nodes hold the training account (cluster.yaml: an env file next to the token);
    # no credential travels in a job's runtime_env or command line.
    node_env = {**with_token, "MLFLOW_TRACKING_USERNAME": TRAINER,
                "MLFLOW_TRACKING_PASSWORD": TRAINER_PW}
    # A stranger: no token anywhere (not even ~/.ray/auth_token: another HOME).
    home = tmp_path / "stranger"
    home.mkdir()
    stranger = {k: v for k, v in ray_env({"HOME": str(home)}).items()
                if not k.startswith("RAY_AUTH") and not k.startswith("MLFLOW_TRACKING_")}
    wrong = {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    pwned = tmp_path / "pwned"
    session = tempfile.mkdtemp(prefix="ray-auth-", dir="/tmp")
    port = free_port()
    try:
        with local_head(env=node_env, port=port, temp_dir=session) as address:
            ray_bin = str(Path(sys.executable).parent / "ray")
            fast = {"RAY_NUM_REDIS_GET_RETRIES": "3"}   # a refusal is final: few retries
            joins = {"ray.init, no token": _ray_init(port, {**stranger, **fast}),
                     "ray.init, wrong token": _ray_init(port, {**wrong, **fast})}
            attempt = [ray_bin, "job", "submit", "--address", address, "--", "touch",
                       str(pwned)]
            outcomes, outputs = {}, {}
            for what, env in [("ray job submit, no token", stranger),
                              ("ray job submit, wrong token", wrong)]:
                outcomes[what], outputs[what] = _ray_cli(attempt, env)
            for what, token_sent in [("no token", None), ("wrong token", secrets.token_hex(32))]:
                outcomes[f"REST POST /api/jobs/, {what}"] = _http(
                    f"{address}/api/jobs/", data={"entrypoint": f"touch {pwned}"},
                    token=token_sent)
                outcomes[f"REST GET /api/jobs/, {what}"] = _http(f"{address}/api/jobs/",
                                                                 token=token_sent)
            assert _http(f"{address}/api/jobs/", token=token) == 200   # the probe can pass

            # the authorised job (the strangers above still try to join meanwhile)
            start = time.monotonic()
            proc = submit(address, [
                "python", "jobs/train.py", "--data", prepared_cpu, "--epochs", "1",
                "--run-name", "on-a-token-cluster", "--storage", str(tmp_path / "ray"),
                "--mlflow-uri", auth_server.uri, "--register-name", NAME,
                "--set", "train.cpus_per_worker=0.5"], working_dir=str(ROOT),
                env=with_token)
            for what, join in joins.items():
                output = join.communicate(timeout=300)[0]
                outcomes[what] = "refused" if join.returncode != 0 else "ACCEPTED"
                outputs[what] = output
            print(f"{len(outcomes)} attempts without the token: {sorted(outcomes.items())}")
            accepted = {k: v for k, v in outcomes.items() if v not in ("refused", 401, 403)}
            assert not accepted, accepted
            for what, output in outputs.items():   # refused for the token, not otherwise
                assert "AuthenticationError" in output or "InvalidAuthToken" in output, \
                    f"{what}: {output[-1500:]}"
            console = proc.stdout + proc.stderr
            assert proc.returncode == 0, console[-4000:]
            assert f"registered model: models:/{NAME}@candidate" in console
            print(f"the job on the token cluster: {time.monotonic() - start:.0f} s")
            listed = subprocess.run([ray_bin, "job", "list", "--address", address],
                                    env=ray_env(with_token), capture_output=True, text=True)
            assert listed.stdout.count("JobDetails(") == 1, listed.stdout  # only ours
        assert not pwned.exists()

        with credentials(READER, READER_PW):
            model = tracking.load_model(f"models:/{NAME}@candidate", auth_server.uri)
            assert sum(p.numel() for p in model.generator.parameters()) > 0
            reader = mlflow.MlflowClient(auth_server.uri)
            assert _refused(lambda: reader.set_registered_model_alias(
                NAME, "production", model.version)) == "PERMISSION_DENIED"

        # the secrets scan of #16, for the Ray token and the MLflow passwords
        with credentials(ADMIN, ADMIN_PW):
            client = mlflow.MlflowClient(auth_server.uri)
            version = client.get_model_version_by_alias(NAME, "candidate")
            run = client.get_run(version.run_id)
            texts = {"console": console, "params": repr(run.data.params),
                     "tags": repr(run.data.tags),
                     "metric names": repr(sorted(run.data.metrics)),
                     "version": repr(version.tags) + (version.description or "")}
            artifacts = Path(mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts"),
                tracking_uri=auth_server.uri))
            registered = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{NAME}/{version.version}",
                dst_path=str(tmp_path / "model"), tracking_uri=auth_server.uri))
        blobs = {**read_all("artifact", artifacts, tmp_path),
                 **read_all("artifact", registered, tmp_path),
                 **read_all("ray log", Path(session)),
                 **read_all("checkpoint", tmp_path / "ray", tmp_path)}
        assert any(k.startswith("ray log") for k in blobs) and len(blobs) > 10
        assert any(k.startswith("checkpoint") for k in blobs)
        found = leaks([token, TRAINER_PW, READER_PW, ADMIN_PW], texts, blobs)
        assert not found, found
    finally:
        shutil.rmtree(session, ignore_errors=True)


def test_cluster_yaml_starts_every_node_with_the_token_and_a_local_dashboard():
    import yaml

    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head and workers
    for command in head + workers:   # the token mode and the nodes' credentials file
        assert "export RAY_AUTH_MODE=token;" in command, command
        assert ". ~/.cvaa/cluster.env;" in command, command
    assert all("--dashboard-host=127.0.0.1" in c for c in head)
    assert "0.0.0.0" not in text
    # the secrets come from files outside the checkout, copied by `ray up`
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/.cvaa/cluster.env"] == "~/.cvaa/cluster.env"
    for variable in ("RAY_AUTH_TOKEN=", "MLFLOW_TRACKING_PASSWORD=", "AWS_SECRET_ACCESS_KEY="):
        assert variable not in text
