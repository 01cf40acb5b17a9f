"""A real two-node Slurm on this host, for tests: Debian's slurmctld, slurmd and munge.

`LocalSlurm` starts its own munged (own key and socket), one slurmctld and two slurmd
"nodes" (distinct NodeName and port, same host address 127.0.0.1), all configured from a
temporary directory: nothing under /etc or /var is written, and clients find the cluster
through SLURM_CONF in `LocalSlurm.env` (the test process's own environment is left alone).
`stop` cancels the jobs, then ends every process carrying that SLURM_CONF (the daemons,
slurmstepd and job tasks: all started by this object), by pid.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def which(name: str) -> Optional[str]:
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin")
                                       if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_installed() -> Optional[str]:
    """Install Slurm from Debian's packages if needed; returns a reason to skip, or None.

    Skips only when not root or when apt-get is missing; an apt-get that fails is an error.
    """
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if all(which(b) for b in BINARIES):
        return None
    if not which("apt-get"):
        return f"Slurm is not installed and apt-get is unavailable to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode or not all(which(b) for b in BINARIES):
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return None


def _free_ports(n: int) -> list[int]:
    from megatron_llama.local_ranks import free_port

    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _first_job_id() -> int:
    """A job id whose rendezvous port (20000 + id % 20000, see parallel.py) is free now, so
    a busy port 20001 on this host cannot fail the test's job 1."""
    import random
    import socket

    for job_id in random.Random(os.getpid()).sample(range(1000, 19000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
                return job_id
            except OSError:
                continue
    return 1


class LocalSlurm:
    """Two slurmd nodes (n1, n2, 1 CPU each) and a controller, configured under ``root``."""

    # A requeued job waits AuthInfo's cred_expire (120 s by default) before it may start
    # again; the main scheduler loop runs every sched_interval (60 s). Both shortened here.
    CRED_EXPIRE = 10
    NODES = ("n1", "n2")

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="megatron_llama_slurm_"))
        self.root.chmod(0o755)  # munged runs as the munge user and must reach its socket
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[subprocess.Popen] = []
        self.jobs: list[str] = []

    # ---- start / stop --------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "LocalSlurm":
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        socket = mdir / "munge.socket"
        logs = self.root / "log"
        logs.mkdir()
        self._spawn([which("munged"), "-F", f"--socket={socket}", f"--key-file={key}",
                     f"--log-file={mdir}/munged.log", f"--pid-file={mdir}/munged.pid",
                     f"--seed-file={mdir}/munged.seed"], logs / "munged.out",
                    user=munge.pw_uid, group=munge.pw_gid)
        self.wait_for(socket.exists, 30, "munged socket")
        ctld_port, *node_ports = _free_ports(1 + len(self.NODES))
        for name in self.NODES:
            (self.root / "spool" / name).mkdir(parents=True)
        (self.root / "state").mkdir()
        (self.root / "plugstack.conf").write_text("")
        host = os.uname().nodename.split(".")[0]
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} "
                          "CPUs=1 State=UNKNOWN" for n, p in zip(self.NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=mlltest
FirstJobId={_first_job_id()}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire={self.CRED_EXPIRE}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
PlugStackConfig={self.root}/plugstack.conf
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn([which("slurmctld"), "-D", "-f", str(self.conf)], logs / "slurmctld.out")
        self.wait_for(lambda: self._ok("scontrol", "ping"), 30, "slurmctld to answer")
        for name in self.NODES:
            self._spawn([which("slurmd"), "-D", "-N", name, "-f", str(self.conf)],
                        logs / f"slurmd-{name}.out")
        self.wait_for(lambda: self.node_states() == {n: "idle" for n in self.NODES}, timeout,
                      "both nodes idle")
        return self

    def stop(self, timeout: float = 60) -> None:
        """Cancel the jobs, then end every process this cluster started (daemons last)."""
        try:
            if self.jobs:
                self._ok("scancel", *self.jobs)
                self.wait_for(lambda: not self.run("squeue", "-h", "-o", "%i").strip(),
                              timeout, "the queue to empty", fail=False)
        finally:
            for proc in self._our_processes():  # job tasks and slurmstepd left, if any
                _kill(proc.pid)
            for proc in reversed(self.daemons):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _our_processes(self) -> list:
        import psutil

        marker = f"SLURM_CONF={self.conf}"
        daemons = {p.pid for p in self.daemons}
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in daemons or proc.pid == os.getpid():
                continue
            try:
                if marker in "\0".join(f"{k}={v}" for k, v in proc.environ().items()):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def _spawn(self, cmd: list, log: Path, **kw) -> None:
        with open(log, "ab") as out:
            self.daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                 env=self.env, start_new_session=True, **kw))

    # ---- clients -------------------------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster (in its folder); its stdout."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=self.root)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result.stdout

    def _ok(self, *cmd: str) -> bool:
        try:
            self.run(*cmd)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def node_states(self) -> dict[str, str]:
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T")
        except (RuntimeError, subprocess.TimeoutExpired):
            return {}
        return dict(line.split() for line in out.splitlines() if line.strip())

    def submit(self, script: str) -> str:
        """sbatch ``script``; returns the job id (cancelled by `stop` if still queued)."""
        job = self.run("sbatch", "--parsable", script, timeout=60).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str,
                 fail: bool = True):
        """Poll ``predicate`` every 0.5 s until it is truthy; fail with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        if fail:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 + self.log_tails())
        return None

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
