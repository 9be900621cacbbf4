"""Logging that survives a tracking-server outage: a spool on local disk, sent in order by a
background thread, retried until the server answers again.

Rank 0 of a training run logs every epoch (metrics, figures, checkpoint artifacts). Calling
MLflow directly from the training loop would make a server that is down longer than the
client's retries raise inside the loop; every restart from the checkpoint would fail the same
way and ``max_failures`` would end a multi-day run over a metrics server. With a
:class:`SpooledRun` the loop only appends to the spool (a local file copy at most), and:

- entries are sent in the order they were logged, each with its own step and timestamp;
  a failed send is retried (backoff up to ``max_backoff_s``) until it succeeds;
- :meth:`SpooledRun.dump` writes what is still pending (``pending.jsonl`` plus artifact
  files) into a directory, e.g. the checkpoint that goes to the Ray storage, so a worker
  restart or a server that never comes back loses nothing (copies of checkpoints are left
  out of a dump: the Ray storage holds the checkpoints themselves); :func:`replay` sends such a
  directory later (``python jobs/replay_log.py DIR --mlflow-uri URI``);
- :meth:`SpooledRun.flush` waits, bounded, for the spool to drain;
- a server that refuses the credentials (HTTP 401 / 403) is not an outage: the spool stops
  sending at once, says so in one line naming the variables to set, and keeps its entries
  (:attr:`SpooledRun.refused`; rank 0 stops the training with that message).

Only the MLflow client is used (through :class:`cvaa.tracking.RunLogger`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from cvaa.tracking.runs import auth_refusal

PENDING = "pending.jsonl"


class SpooledRun:
    """``log_metrics`` / ``log_bytes`` / ``log_file`` into one run, through a spool.

    Args:
        tracking_uri, run_id: the run (it must exist).
        spool_dir: where queued artifact files wait (default: a new temp dir).
        max_backoff_s: longest wait between two tries of a failing send.
        on_state: called with a one-line message when sending starts failing and when it
            recovers (the console's business; ``None``: silent).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, spool_dir: str | None = None,
                 max_backoff_s: float = 15.0,
                 on_state: Callable[[str], None] | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        # This loop retries for as long as it takes; MLflow's own retries (7 by default,
        # with exponential backoff) would only delay noticing that the server is back.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.dir = Path(spool_dir or tempfile.mkdtemp(prefix="cvaa-mlflow-spool-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_backoff_s, self.on_state = max_backoff_s, on_state
        self._entries: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._seq = 0
        self._holding = False
        self._held: set[int] = set()   # id() of the entries logged while holding
        self.failures = 0
        self.last_error = ""
        self.refused = ""   # the server's refusal (401 / 403): nothing more is sent
        self._logger = None
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="cvaa-mlflow-spool",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the loop's side

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put({"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                   "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        path = self._spool_path(Path(artifact_file).name)
        path.write_bytes(data)
        parent = str(Path(artifact_file).parent)
        self._put({"kind": "artifact", "file": path.name,
                   "artifact_path": None if parent in ("", ".") else parent})

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None, *,
                 dumped: bool = True) -> None:
        """Queue a copy of ``path``. ``dumped=False``: :meth:`dump` leaves it out (a large
        file that exists elsewhere, e.g. a checkpoint already in the Ray storage)."""
        target = self._spool_path(Path(path).name)
        shutil.copyfile(path, target)
        self._put({"kind": "artifact", "file": target.name, "artifact_path": artifact_path,
                   "dumped": dumped})

    def hold(self) -> None:
        """Entries logged from now on wait for :meth:`release` (they are pending, and
        :meth:`dump` writes them): rank 0 holds an epoch's log until that epoch's checkpoint
        exists, so a worker that dies before has sent nothing its successor will redo."""
        with self._cond:
            self._holding = True

    def release(self) -> None:
        """Send what :meth:`hold` kept back (in order, after anything logged before)."""
        with self._cond:
            self._holding = False
            self._held.clear()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._entries)

    @property
    def failing(self) -> bool:
        """Whether the last send failed (the server is unreachable, or refused)."""
        return self._failing_since is not None or bool(self.refused)

    def settle(self, timeout_s: float) -> bool:
        """:meth:`flush` while the server answers; return at once while it does not (so an
        outage costs the loop nothing, and a reachable server has everything logged before
        the epoch's report, as if the calls were synchronous)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._entries:
                left = deadline - time.monotonic()
                if left <= 0 or self.failing:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything is sent (True) or ``timeout_s`` passes, or the server
        refuses the credentials (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._entries:
                left = deadline - time.monotonic()
                if left <= 0 or self.refused:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def dump(self, directory: str | os.PathLike) -> int:
        """Write the pending entries (and their files) into ``directory``; returns how many.
        They stay queued here too: this is a copy for safe keeping."""
        with self._cond:
            entries = [dict(e) for e in self._entries if e.get("dumped", True)]
        if not entries:
            return 0
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            if entry["kind"] == "artifact":
                shutil.copyfile(self.dir / entry["file"], out / entry["file"])
        (out / PENDING).write_text("".join(json.dumps(e) + "\n" for e in entries))
        (out / "run.json").write_text(json.dumps({"run_id": self.run_id,
                                                  "tracking_uri": self.tracking_uri}))
        return len(entries)

    def requeue(self, directory: str | os.PathLike) -> int:
        """Queue, before anything logged later, the entries a :meth:`dump` left in
        ``directory`` (a restarted rank 0 picking up its predecessor's pending log)."""
        entries = _read_pending(Path(directory))
        for entry in entries:
            if entry["kind"] == "artifact":
                target = self._spool_path(entry["file"].split("-", 1)[-1])
                shutil.copyfile(Path(directory) / entry["file"], target)
                entry["file"] = target.name
        with self._cond:
            self._entries[:0] = entries
            self._cond.notify_all()
        return len(entries)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if not self._entries:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ the sender

    def _spool_path(self, name: str) -> Path:
        with self._cond:
            self._seq += 1
            seq = self._seq
        return self.dir / f"{os.getpid()}{seq:06d}-{name}"

    def _put(self, entry: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the MLflow spool is closed")
            self._entries.append(entry)
            if self._holding:
                self._held.add(id(entry))
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._closed and (not self._entries
                                            or id(self._entries[0]) in self._held):
                    self._cond.wait()
                if not self._entries or id(self._entries[0]) in self._held:
                    return
                entry = self._entries[0]
            try:
                send(self._client(), entry, self.dir)
            except Exception as exc:  # any failure: the server, the network, the store
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                refused = auth_refusal(exc, self.tracking_uri)
                if refused is not None:  # waiting cannot help; the entries stay queued
                    with self._cond:
                        self.refused = str(refused)
                        self._cond.notify_all()
                    self._state(f"MLflow stopped logging: {refused}")
                    return
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    self._state(f"MLflow unreachable ({self.last_error}); training goes on, "
                                f"logging is queued and retried")
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self._cond:
                if self._entries and self._entries[0] is entry:
                    self._entries.pop(0)
                    self._held.discard(id(entry))
                self._cond.notify_all()
            if entry["kind"] == "artifact":
                (self.dir / entry["file"]).unlink(missing_ok=True)
            if self._failing_since is not None:
                down = time.monotonic() - self._failing_since
                self._state(f"MLflow reachable again after {down:.0f} s; sending the "
                            f"{self.pending() + 1} queued entries in order")
                self._failing_since, backoff = None, 1.0

    def _client(self):
        if self._logger is None:
            from cvaa.tracking.runs import RunLogger
            self._logger = RunLogger(self.tracking_uri, self.run_id)
        return self._logger

    def _state(self, message: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(message)
            except Exception:
                pass


def send(run, entry: Mapping[str, Any], directory: Path) -> None:
    """One spooled entry into ``run`` (a :class:`cvaa.tracking.RunLogger`)."""
    if entry["kind"] == "metrics":
        from mlflow.entities import Metric

        run.client.log_batch(run.run_id, metrics=[
            Metric(k, v, entry["timestamp"], entry["step"])
            for k, v in entry["metrics"].items()])
    else:
        # under the artifact's own name, without the spool's sequence prefix
        with tempfile.TemporaryDirectory(prefix="cvaa-art-") as tmp:
            named = Path(tmp) / entry["file"].split("-", 1)[-1]
            shutil.copyfile(Path(directory) / entry["file"], named)
            run.client.log_artifact(run.run_id, str(named), entry.get("artifact_path"))


def _read_pending(directory: Path) -> list[dict[str, Any]]:
    path = directory / PENDING
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(directory: str | os.PathLike, tracking_uri: str, run_id: str | None = None,
           log: Callable[[str], None] = print) -> int:
    """Send a dumped spool (``pending.jsonl`` + files) into its run, in order; returns
    how many entries were sent. ``run_id`` defaults to the one recorded in the dump."""
    from cvaa.tracking.runs import RunLogger

    directory = Path(directory)
    entries = _read_pending(directory)
    meta_path = directory / "run.json"
    if run_id is None:
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no run id recorded; pass one")
        run_id = json.loads(meta_path.read_text())["run_id"]
    run = RunLogger(tracking_uri, run_id)
    for entry in entries:
        try:
            send(run, entry, directory)
        except Exception as exc:
            raise auth_refusal(exc, tracking_uri) or exc
    log(f"replayed {len(entries)} entries into run {run_id} at {tracking_uri}")
    return len(entries)
