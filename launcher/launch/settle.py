"""After the runner exits: make status.json and run.json tell the truth, then release the run dir's lock.

A rank killed by SIGKILL, the OOM killer or a lost node cannot write its status; status.json then still says
`running` (or does not exist). The process that waited for the runner (the local launcher, or the SLURM job
script via `python -m launcher.launch.settle RUN_DIR RC`) writes `failed` in its place. No torch import.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

STATUS = "status.json"
RUN_JSON = "run.json"


def read_status(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def exit_meaning(code: int) -> str:
    if code < 0 or code > 128:
        num = -code if code < 0 else code - 128
        try:
            return f"killed by {signal.Signals(num).name}"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


def settle_status(run_dir: Path, code: int) -> Dict[str, Any]:
    """status.json after the runner exited with `code`: a run still `running` (or without a status) failed."""
    status = read_status(run_dir)
    if status.get("state") in (None, "running"):
        status = {
            "state": "failed",
            "step": _last_logged_step(run_dir),
            "message": f"the ranks ended ({exit_meaning(code)}) without reporting: a rank was killed (SIGKILL, the "
            "OOM killer, a lost node) or died before training started; see the log",
        }
        _write_json(run_dir / STATUS, status)
    return status


def _last_logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (-1: none), the best a launcher knows of where dead ranks were."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the crash
    return -1


def launch_entries(run_dir: Path) -> List[Dict[str, Any]]:
    try:
        data = json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return []
    if isinstance(data, dict) and isinstance(data.get("launches"), list):
        return data["launches"]
    return [data] if isinstance(data, dict) and data else []  # a run dir from before launches were kept


def appended_run_json(run_dir: Path, entry: Dict[str, Any]) -> str:
    """run.json text with one more launch (git SHA, versions, command, host, start; end and exit come later)."""
    return json.dumps({"launches": [*launch_entries(run_dir), entry]}, indent=2) + "\n"


def end_launch(run_dir: Path, code: int, state: Optional[str]) -> None:
    """Record end time, exit status and final state on this launch's run.json entry."""
    entries = launch_entries(run_dir)
    if not entries or "end" in entries[-1]:
        entries.append({"host": socket.gethostname(), "note": "started without the launcher (requeue or by hand)"})
    entries[-1].update({"end": _now(), "exit_code": code, "state": state})
    _write_json(run_dir / RUN_JSON, {"launches": entries})


def settle(run_dir: Path, code: int) -> Dict[str, Any]:
    status = settle_status(run_dir, code)
    end_launch(run_dir, code, status.get("state"))
    return status


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main() -> int:
    """`python -m launcher.launch.settle RUN_DIR RC`: in the SLURM job script after the job step ends.
    Prints `STATE STEP` for the script and releases this job's lock."""
    from launcher.launch import lock

    run_dir, code = Path(sys.argv[1]), int(sys.argv[2])
    status = settle(run_dir, code)
    if os.environ.get("SLURM_JOB_ID"):
        lock.release(run_dir, lock.slurm_holder(os.environ["SLURM_JOB_ID"]))
    print(status.get("state", "none"), status.get("step", "?"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
