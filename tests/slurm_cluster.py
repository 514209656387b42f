"""A real SLURM cluster on this machine for tests: Debian's slurm-wlm, one slurmctld and two slurmd
daemons emulating two nodes (node1, node2) on one host (see ../shared/notes/STACK.md). Stopped by PID at
the end, even on failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol"))


def _ensure_hosts() -> None:
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    if not all(f" {n}" in text or f"\t{n}" in text for n in ("node1", "node2")):
        with open(hosts, "a") as fh:
            fh.write("\n127.0.0.1 node1 node2\n")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.conf = self.base / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "Cluster":
        _ensure_hosts()
        b = self.base
        for d in ("state", "spool"):
            (b / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        p1, p2 = _port(), _port()
        while p2 == p1 + 1 or p1 == p2:
            p2 = _port()
        self.conf.write_text(f"""
ClusterName=minitron
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.%n.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0
ReturnToService=2
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc={b}/jobcomp.txt
MpiDefault=none
KillWait=5
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=12000 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=12000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], env=self.env, check=True)
        for n in ("node1", "node2"):
            subprocess.run(["slurmd", "-N", n, "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t %D", check=False).stdout
            if out.strip().startswith("idle") and out.split()[-1] == "2":
                return self
            time.sleep(1)
        raise RuntimeError(f"cluster did not come up: {self.run('sinfo', check=False).stdout}\n"
                           + (b / "slurmctld.log").read_text()[-3000:])

    def run(self, *cmd, check=True, timeout=60):
        return subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def job(self, job_id) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if j.get("JobState") in states:
                return j
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')}")

    def stop(self) -> None:
        for pid_file in sorted(self.base.glob("*.pid")):
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass
        subprocess.run(["pkill", "-f", f"-f {self.conf}"], check=False)
