"""One live run per run dir: `<run_dir>/.lock` names the training that holds it.

The holder is the training, not the launcher process that started it:
- cluster=local: the `deepspeed` runner's session (the launcher starts it with start_new_session, so the runner,
  launch.py and the ranks share one session id, and they outlive a killed launcher). Until the runner exists
  the launcher's own pid holds the lock. Alive = some process on that host is in that session (or the pid
  lives, with the same start time). A pid says nothing on another host: there the lock's heartbeat decides
  (rank 0 touches the file every HEARTBEAT_S; see launcher/worker/heartbeat.py).
- SLURM: the job id. Alive = the scheduler says the job is pending/running (`squeue`, with a timeout). A
  requeued attempt of the same job takes its lock back.

Taking the lock is `link(tmp, .lock)`, atomic on local filesystems and NFS alike (flock is not reliable on
NFS). A lock whose holder is dead is moved aside and taken over. No torch import.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Optional

from launcher.errors import ConfigError

LOCK = ".lock"
# Rank 0 touches the lock this often; a lock from another host with no heartbeat for STALE_S is dead.
HEARTBEAT_S = 30
STALE_S = 300
SLURM_TIMEOUT_S = 30
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((run_dir / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: treated as a dead holder


def local_holder(pid: int, session: Optional[int] = None) -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid), "session": session,
            "since": _now()}


def slurm_holder(job_id: str) -> Dict[str, Any]:
    return {"host": socket.gethostname(), "slurm_job": str(job_id), "since": _now()}


def describe(holder: Dict[str, Any]) -> str:
    since = holder.get("since", "?")
    if holder.get("slurm_job"):
        return f"SLURM job {holder['slurm_job']} (since {since})"
    who = f"session {holder['session']}" if holder.get("session") else f"pid {holder.get('pid')}"
    return f"{who} on {holder.get('host')} (since {since})"


def how_to_stop(holder: Dict[str, Any]) -> str:
    if holder.get("slurm_job"):
        return f"scancel --signal=USR1 {holder['slurm_job']}"
    pid = holder.get("pid")
    launcher_alive = pid and holder.get("host") == socket.gethostname() and \
        _start_time(int(pid)) == holder.get("pid_start")
    if holder.get("session") and not launcher_alive:
        # The launcher is gone: signal the ranks themselves (not launch.py, which SIGKILLs them 30 s later).
        return f"pkill -TERM -s {holder['session']} -f -- '-m launcher.worker'"
    return f"kill -TERM {pid}, which checkpoints and stops the ranks"


def alive(holder: Optional[Dict[str, Any]], lock_path: Optional[Path] = None) -> bool:
    if not holder:
        return False
    if holder.get("slurm_job"):
        state = _slurm_state(holder["slurm_job"])
        if state is not None:
            return state in _LIVE_JOB_STATES
        return _fresh(lock_path)  # no scheduler to ask from here: the heartbeat decides
    if holder.get("host") != socket.gethostname():
        return _fresh(lock_path)  # a pid is only meaningful on its own host
    if holder.get("session") and session_alive(int(holder["session"])):
        return True
    pid = holder.get("pid")
    start = _start_time(int(pid)) if pid else None
    return start is not None and start == holder.get("pid_start")  # same pid, same process (not a reused pid)


def _refusal(run_dir: Path, current: Dict[str, Any]) -> ConfigError:
    return ConfigError(
        "run dir",
        f"{run_dir} is in use by the run of {describe(current)}; wait for it, stop it ({how_to_stop(current)}), "
        "or start a new run with name=<new name>",
    )


def refuse_if_live(run_dir: Path, own_job: Optional[str] = None) -> None:
    """Raise the one-line refusal when another live run holds run_dir (a check only; acquire() takes it).
    Inside a SLURM job, that job's own lock (a requeued attempt) is not another run."""
    own_job = own_job or os.environ.get("SLURM_JOB_ID")
    current = read(run_dir)
    if current and not (own_job and current.get("slurm_job") == own_job) and alive(current, run_dir / LOCK):
        raise _refusal(run_dir, current)


def acquire(run_dir: Path, holder: Dict[str, Any]) -> None:
    """Take the run dir's lock for `holder`, or raise ConfigError naming the live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    for _ in range(5):
        tmp = run_dir / f".lock.{socket.gethostname()}.{os.getpid()}"
        tmp.write_text(json.dumps(holder) + "\n")
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            current = read(run_dir)
            if current is None:
                continue  # released meanwhile
            same_job = holder.get("slurm_job") and current.get("slurm_job") == holder.get("slurm_job")
            if not same_job and alive(current, path):
                raise _refusal(run_dir, current) from None
            # Dead holder (or our own requeued job): move its lock aside and retry; a racing taker loses here.
            try:
                os.replace(path, run_dir / f".lock.stale.{os.getpid()}")
                os.unlink(run_dir / f".lock.stale.{os.getpid()}")
            except FileNotFoundError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    raise ConfigError("run dir", f"could not take {path} (another launch is racing for it); retry")


def update(run_dir: Path, holder: Dict[str, Any]) -> None:
    """Rewrite our own lock (e.g. the runner's session now holds it) atomically."""
    tmp = run_dir / f".lock.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(holder) + "\n")
    os.replace(tmp, run_dir / LOCK)


def release(run_dir: Path, holder: Dict[str, Any]) -> None:
    """Remove the lock if it is still ours (same pid/session or job)."""
    try:
        current = read(run_dir)
    except OSError:
        return
    keys = ("slurm_job",) if holder.get("slurm_job") else ("host", "pid", "session")
    if current and all(current.get(k) == holder.get(k) for k in keys):
        (run_dir / LOCK).unlink(missing_ok=True)


def heartbeat(run_dir: Path) -> None:
    try:
        os.utime(run_dir / LOCK)
    except OSError:
        pass


def _fresh(lock_path: Optional[Path]) -> bool:
    try:
        return lock_path is not None and time.time() - lock_path.stat().st_mtime < STALE_S
    except OSError:
        return False


def _start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, zombie or not ours to see: no start time
        return None


def session_alive(sid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and not _zombie(int(entry)):
                    return True
            except OSError:
                continue
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _slurm_state(job_id: str) -> Optional[str]:
    """The job's state from squeue ("" when the scheduler no longer knows it), None without a scheduler."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().split("\n")[0].strip()


def main(argv: Optional[list] = None) -> int:
    """`python -m launcher.launch.lock acquire|release RUN_DIR` inside a SLURM job (the rendered .sbatch)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    action, run_dir = args[0], Path(args[1])
    holder = slurm_holder(os.environ["SLURM_JOB_ID"])
    try:
        if action == "acquire":
            acquire(run_dir, holder)
        else:
            release(run_dir, holder)
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
