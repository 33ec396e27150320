"""cluster=local: run the rendered launch.sh (the `deepspeed` runner and this node's ranks) and wait for it.

The run dir's lock is held by the runner's session (launcher.launch.lock). Ctrl-C / SIGTERM / SIGUSR1 /
SIGHUP here reach the ranks only (Stopper): they checkpoint at the next step boundary and exit 0. Afterwards
status.json and run.json are settled (launcher.launch.settle): a rank that died silently reads `failed`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from launcher.launch import lock
from launcher.launch.jit_locks import check_jit_locks
from launcher.launch.settle import read_status, settle
from launcher.launch.shm import remove_shm_files
from launcher.render.rundir import resume_command

# A second Ctrl-C within this many seconds of the first is ignored (the ranks are saving); after it, a
# second one SIGKILLs the ranks. Ranks that have not stopped this long after their checkpoint are killed too.
HARD_STOP_AFTER_S = float(os.environ.get("LAUNCHER_HARD_STOP_AFTER_S", "10"))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def rank_pids(session: int) -> List[int]:
    """The ranks in the runner's session: `python -u -m launcher.worker ...`, not DeepSpeed's launch.py
    (whose argv also names launcher.worker, and which SIGKILLs its ranks 30 s after a SIGTERM of its own)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        try:
            if "launcher.worker" in cmd and cmd[cmd.index("launcher.worker") - 1] == "-m" and \
                    "deepspeed.launcher.launch" not in cmd and os.getsid(proc.info["pid"]) == session:
                pids.append(proc.info["pid"])
        except (OSError, ValueError):
            continue
    return pids


class Stopper:
    """Installed before the runner starts. The first stop signal asks the ranks (only them) to checkpoint and
    exit; ranks that start later are asked too. A second Ctrl-C after HARD_STOP_AFTER_S ends them hard."""

    def __init__(self) -> None:
        self.session: Optional[int] = None
        self.requested: Optional[str] = None
        self.first_at = 0.0
        self.asked: set = set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _say(self, text: str) -> None:
        try:
            print(text, file=sys.stderr, flush=True)
        except OSError:
            pass  # the terminal is gone (SIGHUP)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:  # the terminal is gone: later writes would fail (EIO) and end this process
            sys.stdout = sys.stderr = open(os.devnull, "w")
        if self.requested is None:
            self.requested, self.first_at = name, time.monotonic()
            self._say(f"\n{name}: asking the ranks to checkpoint and stop (again after {HARD_STOP_AFTER_S:.0f} s: "
                      "kill them without a checkpoint) ...")
            self.forward()
        elif signum == signal.SIGINT and time.monotonic() - self.first_at >= HARD_STOP_AFTER_S:
            self._say(f"{name} again: killing the ranks now, without a checkpoint")
            self.kill()
        else:
            self._say(f"{name}: the ranks are checkpointing; wait, or send Ctrl-C again after "
                      f"{HARD_STOP_AFTER_S:.0f} s to kill them")

    def forward(self) -> None:
        if self.requested is None or self.session is None:
            return
        for pid in rank_pids(self.session):
            if pid not in self.asked:
                try:
                    os.kill(pid, signal.SIGTERM)
                    self.asked.add(pid)
                except OSError:
                    pass

    def kill(self) -> None:
        if self.session is not None:
            try:
                os.killpg(self.session, signal.SIGKILL)
            except OSError:
                pass


def launch_local(run_dir: Path, command: Sequence[str], argv: Sequence[str]) -> int:
    """Run <run_dir>/launch.sh under the run dir's lock (already taken by the caller for this process);
    returns its exit code. `argv` is the user's command line (for the resume hint)."""
    for note in check_jit_locks():
        print(note, file=sys.stderr)
    stopper = Stopper()
    holder = lock.local_holder(os.getpid())
    print(f"launching: bash {run_dir / 'launch.sh'}", flush=True)
    # Own session: a terminal Ctrl-C reaches only this process, which stops the ranks in order (Stopper).
    # The session leader is a bash that waits (no exec): a session leader that opens a terminal device
    # (e.g. /dev/stdout) makes it its controlling terminal, and closing that terminal would then SIGHUP the
    # runner directly. stdin is /dev/null: the ranks never read it.
    proc = subprocess.Popen(["bash", "-c", 'bash "$0"; exit $?', str(run_dir / "launch.sh")],
                            start_new_session=True, stdin=subprocess.DEVNULL)
    stopper.session = proc.pid
    holder = {**holder, "session": proc.pid}
    lock.update(run_dir, holder)
    code = _wait(proc, stopper, run_dir)
    remove_shm_files(_master_port(command))  # left by ranks that were killed
    status = settle(run_dir, code)
    lock.release(run_dir, holder)
    again, left_out = resume_command(argv)
    if left_out:
        again += f"   (with {', '.join(left_out)} set in the environment, as for this launch)"
    if status.get("state") == "preempted":
        print(f"stopped by signal after checkpointing step {status['step']}. resume: {again}")
        return 0
    if code == 0 and status.get("state") == "completed":
        more = 2 * int(status.get("step") or 1)
        print(f"done. run dir: {run_dir}\n  resume/extend: {again} train.max_steps={more}   (any larger value)")
        print(f"  export:        python -m launcher.export run_dir={run_dir}")
        return 0
    print(f"launch failed ({status.get('message') or f'exit code {code}'}); logs above, artifacts in {run_dir}",
          file=sys.stderr)
    print(f"  resume from the last checkpoint: {again}", file=sys.stderr)
    return code or 1


def _wait(proc: subprocess.Popen, stopper: Stopper, run_dir: Path) -> int:
    """The runner's exit code, once its whole session (launch.py, ranks still saving) is gone. After a stop,
    ranks that checkpointed (status `preempted`) but linger HARD_STOP_AFTER_S later are killed."""
    code: Optional[int] = None
    saved_at: Optional[float] = None
    while code is None or lock.session_alive(proc.pid):
        if code is None:
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.5)
        stopper.forward()  # ranks started after the signal are asked too
        if stopper.requested and saved_at is None and read_status(run_dir).get("state") == "preempted":
            saved_at = time.monotonic()
        if saved_at is not None and time.monotonic() - saved_at > HARD_STOP_AFTER_S:
            stopper._say(f"the ranks checkpointed but did not exit within {HARD_STOP_AFTER_S:.0f} s: killing them")
            stopper.kill()
            saved_at = float("inf")
    return code


def _master_port(command: Sequence[str]) -> int:
    return int(command[list(command).index("--master_port") + 1])
