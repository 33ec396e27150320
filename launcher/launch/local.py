"""cluster=local: run the rendered launch.sh (the `deepspeed` runner and this node's ranks) and wait for it.

Ctrl-C / SIGTERM / SIGUSR1 here ask the ranks to checkpoint at the next step boundary and exit; the outcome
is read back from the ranks' status.json.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from launcher.launch.jit_locks import check_jit_locks
from launcher.launch.shm import remove_shm_files
from launcher.render.rundir import redact


def launch_local(run_dir: Path, command: Sequence[str], argv: Sequence[str]) -> int:
    """Run <run_dir>/launch.sh; returns its exit code. `argv` is the user's command line (for the resume hint)."""
    for note in check_jit_locks():
        print(note, file=sys.stderr)
    print(f"launching: bash {run_dir / 'launch.sh'}", flush=True)
    # Own session: a terminal Ctrl-C reaches only this process, which stops the ranks in order below.
    proc = subprocess.Popen(["bash", str(run_dir / "launch.sh")], start_new_session=True)

    def stop_ranks(signum: int, frame: object) -> None:
        # Signal the ranks themselves: they agree on the next step boundary, checkpoint and exit 0, and the
        # runner then exits normally. (DeepSpeed's local runner dies on SIGTERM without passing it on.)
        import psutil

        print(f"\n{signal.Signals(signum).name}: asking the ranks to checkpoint and stop ...", file=sys.stderr)
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "launcher.worker" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, stop_ranks)
    code = proc.wait()
    remove_shm_files(_master_port(command))  # left by ranks that were killed
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    kept = [redact(a) for a in argv if not a.startswith("train.max_steps=")]
    again = " ".join(["python -m launcher", *kept])
    if status.get("state") == "preempted":
        print(f"stopped by signal after checkpointing step {status['step']}. resume: {again}")
        return 0
    if code == 0:
        print(f"done. run dir: {run_dir}\n  resume/extend: {again} train.max_steps=<more>")
        print(f"  export:        python -m launcher.export run_dir={run_dir}")
    else:
        print(f"launch failed with exit code {code}; logs above, artifacts in {run_dir}", file=sys.stderr)
        print(f"  resume from the last checkpoint: {again}", file=sys.stderr)
    return code


def _master_port(command: Sequence[str]) -> int:
    return int(command[list(command).index("--master_port") + 1])
