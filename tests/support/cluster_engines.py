"""Real engines for the grid tests: a one-node Slurm cluster (with or without accounting) and a two-node Ray
cluster, started on this machine, plus a tiny grid that needs no data from outside the repository.

Everything a fixture starts lives under its own temporary directory, listens on 127.0.0.1 on ports picked
free at start, and is stopped by process id at the end (never `ray stop` or `pkill`: other users' daemons on
this machine are left alone). As root, missing Debian packages (slurm-wlm munge, slurmdbd mariadb-server) are
installed with apt-get; where that is impossible the engine's tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COUNTERFACT = REPO / "tests" / "fixtures" / "counterfact_small.json"
PYTHON_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- processes and ports


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (the kernel picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(n: int) -> int:
    """The first of `n` consecutive free ports (Ray's worker port range)."""
    for base in range(47000, 60000, n + 7):
        if all(_port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def processes_mentioning(text: str) -> list[int]:
    """Ids of the processes whose command line or environment contains `text` (a fixture's own temporary
    directory: in the arguments of Ray's processes, in SLURM_CONF of Slurm's daemons and jobs)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                seen = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
            except OSError:
                continue
            if text.encode() in seen:
                out.append(int(d.name))
    return out


def parent_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def stop_pids(pids, grace: float = 5.0) -> None:
    """SIGTERM these processes, then SIGKILL the ones still alive after `grace` seconds."""
    pids = [p for p in pids if p]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:        # a zombie (exited, not yet reaped by its parent) is not alive
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def ensure_packages(binaries: dict[str, str]) -> None:
    """Install the Debian packages of the missing binaries ({binary: package}); skip the test if impossible."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None
                      and not Path("/usr/sbin", binary).exists()})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"Debian packages {' '.join(missing)} are missing and cannot be installed here (needs root and "
                    f"apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        pytest.skip(f"`{' '.join(cmd)}` failed, so the real engine cannot run here: {p.stderr.strip()[-500:]}")


# --------------------------------------------------------------------------- Slurm


class SlurmCluster:
    """munged + slurmctld + slurmd (+ mariadb + slurmdbd with accounting) under `root`, all on 127.0.0.1."""

    def __init__(self, root: Path, accounting: bool):
        self.root, self.accounting = root, accounting
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.seconds = 0.0

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def _check(self, what: str, cmd: list[str]) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"{what}: `{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*")))

    def start(self) -> SlurmCluster:
        t0 = time.perf_counter()
        r = self.root
        for d in ("log", "state", "spool", "munge", "db"):
            (r / d).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)
        munge = r / "munge"
        subprocess.run(["mungekey", "--create", "--keyfile", str(munge / "munge.key")], check=True,
                       capture_output=True)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(munge / "munge.key", "munge", "munge")
        munge.chmod(0o711)
        sock = munge / "munge.sock"
        self._spawn("munged", ["runuser", "-u", "munge", "--", "munged", "--foreground", f"--socket={sock}",
                               f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        wait_for(sock.exists, 20, "munged's socket")
        ctld, slurmd, dbd, db = free_ports(4)
        conf = [
            "ClusterName=editdecaytest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld}",
            f"SlurmdPort={slurmd}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={sock}", "CredType=cred/munge", f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}", f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}", f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "MinJobAge=600", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        if self.accounting:
            self._start_accounting(sock, dbd, db)
            conf += ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
                     f"AccountingStoragePort={dbd}", f"AccountingStoragePass={sock}",
                     "JobAcctGatherType=jobacct_gather/linux"]
        else:
            conf += ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
        self.conf.write_text("\n".join(conf) + "\n")
        if self.accounting:         # slurm.conf exists before any sacctmgr call
            wait_for(lambda: subprocess.run(["sacctmgr", "-i", "add", "cluster", "editdecaytest"], env=self.env,
                                            capture_output=True).returncode == 0, 30, "sacctmgr add cluster")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
        wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                                  text=True).stdout, 60, f"an idle Slurm node\n{self.logs()}")
        self._check("srun", ["srun", "-N1", "true"])
        if self.accounting:
            self._check("sacct", ["sacct", "-n", "-X"])
        self.seconds = round(time.perf_counter() - t0, 1)
        return self

    def _start_accounting(self, sock: Path, dbd_port: int, db_port: int) -> None:
        r = self.root
        data = r / "db" / "data"
        self._check("mariadb-install-db", ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                                           "--auth-root-authentication-method=normal", "--skip-test-db"])
        dsock = r / "db" / "mysqld.sock"
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={dsock}",
                                 f"--port={db_port}", "--bind-address=127.0.0.1", "--user=root",
                                 f"--pid-file={r / 'db' / 'mariadb.pid'}", "--skip-name-resolve",
                                 "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
                                 "--performance-schema=OFF"])
        client = ["mariadb", "--no-defaults", "-S", str(dsock), "-u", "root"]
        wait_for(lambda: subprocess.run([*client, "-e", "select 1"], capture_output=True).returncode == 0, 60,
                 "mariadb")
        self._check("database user", [*client, "-e", "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmtest'; "
                                     "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"])
        dbd_conf = r / "slurmdbd.conf"          # read from the directory of SLURM_CONF
        dbd_conf.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={sock}", "DbdHost=localhost", "DbdAddr=127.0.0.1",
            f"DbdPort={dbd_port}", "SlurmUser=root", f"LogFile={r / 'log' / 'slurmdbd.log'}",
            f"PidFile={r / 'slurmdbd.pid'}", "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={db_port}", "StorageUser=slurm", "StoragePass=slurmtest", "StorageLoc=slurm_acct_db"]) + "\n")
        dbd_conf.chmod(0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D", "-s"])
        wait_for(lambda: not _port_free(dbd_port), 60, f"slurmdbd on port {dbd_port}\n{self.logs()}")

    def stop(self) -> None:
        subprocess.run(["scancel", "-u", "root"], env=self.env, capture_output=True, timeout=30)
        stop_pids([p.pid for p in reversed(self.procs)])
        for p in self.procs:
            with _suppress():
                p.wait(timeout=10)
        stop_pids(processes_mentioning(str(self.root)))          # job steps and anything left behind
        shutil.rmtree(self.root, ignore_errors=True)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def start_slurm(accounting: bool) -> SlurmCluster:
    binaries = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
    if accounting:
        binaries.update(slurmdbd="slurmdbd", mariadbd="mariadb-server")
    ensure_packages(binaries)
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons of the test cluster run as root (SlurmUser=root); not root here")
    # short path: unix sockets (munge) have a 107-character limit
    root = Path(tempfile_dir("edslurm"))
    cluster = SlurmCluster(root, accounting)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def tempfile_dir(prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")


# --------------------------------------------------------------------------- Ray


class RayCluster:
    """A head node and a second node (`ray start --block` each, one CPU each) on 127.0.0.1; the second node has
    the custom resource `node2`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.seconds = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        # every process of the cluster and its drivers: the same authentication mode (token, from ~/.ray)
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}

    def _ray_start(self, name: str, args: list[str]) -> None:
        ports = free_ports(6)
        workers = free_range(12)
        cmd = [str(PYTHON_BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
               "--object-store-memory", str(80 * 2**20), "--temp-dir", str(self.root / name),
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
               "--min-worker-port", str(workers), "--max-worker-port", str(workers + 11), *args]
        log = self.root / f"{name}.out"
        self.procs[name] = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        wait_for(lambda: "Ray runtime started" in log.read_text() or self.procs[name].poll() is not None, 90,
                 f"ray start ({name})")
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"ray start ({name}) exited {self.procs[name].returncode}:\n{log.read_text()[-3000:]}")

    def start(self) -> RayCluster:
        t0 = time.perf_counter()
        subprocess.run([str(PYTHON_BIN / "ray"), "get-auth-token", "--generate"], env=self.env, capture_output=True)
        (self.port,) = free_ports(1)
        self._ray_start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--disable-usage-stats"])
        self._ray_start("node2", ["--address", self.address, "--resources", json.dumps({"node2": 1})])
        self.seconds = round(time.perf_counter() - t0, 1)
        return self

    def raylet(self, name: str) -> int:
        """The raylet process of node `name` (head or node2)."""
        return next(p for p in processes_mentioning(str(self.root / name)) if _comm(p) == "raylet")

    def stop(self) -> None:
        stop_pids([p.pid for p in self.procs.values()], grace=10)     # `ray start --block` stops its processes
        stop_pids(processes_mentioning(str(self.root)))               # workers whose raylet died, and the like
        shutil.rmtree(self.root, ignore_errors=True)


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- a tiny grid


def make_world(root: Path) -> dict:
    """A tiny random Llama saved to disk (the embedded model's tokenizer) and a statistics corpus."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from editdecay.core.models import EMBEDDED_NAME, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(EMBEDDED_NAME))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    words = "the of and a in to is was for on that by with as at from his her it an were are which".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60))
                                                 for i in range(20)))
    return {"root": root, "model": root / "tiny-llama", "corpus": root / "corpus.txt", "cache": root / "cache"}


def write_engine_grid(world: dict, path: Path, name: str, n_edits: int = 0, max_attempts: int = 3) -> Path:
    """Two cells (LoRA and full fine-tuning of the tiny model; with n_edits, MEMIT edits first) on counterfact data
    shipped with the tests: 4 stages without edits (2 fine-tunings, 2 cell results)."""
    d = {
        "name": name,
        "models": [{"name": str(world["model"]), "label": "tiny"}],
        "editors": [{"name": "memit", "overrides": {"layers": [1], "v_num_grad_steps": 5, "n_context_templates": 1,
                                                    "context_length": 5, "mom2_update_weight": 10.0}}],
        "edit_data": [f"counterfact:{COUNTERFACT}"],
        "n_edits": [n_edits],
        "recipes": [{"method": ["lora", "full"], "layers": ["all"], "preset": "embedded",
                     "overrides": {"max_steps": 4, "batch_size": 4, "warmup_steps": 0, "lora_r": 4,
                                   "lora_alpha": 8.0}}],
        "finetune_data": ["embedded"],
        "shared": {"statistics": {"corpus": str(world["corpus"]), "tokens": 256, "batch_size": 8},
                   "evaluation": {"eval_every": 2}, "embedded_task": {"n_train": 24, "n_test": 8},
                   "device": "cpu", "threads": 1, "cache_dir": str(world["cache"]), "max_attempts": max_attempts},
        "slurm": {"timeout_min": 20},
    }
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --------------------------------------------------------------------------- reading a run


def stage_counts(store) -> dict:
    """Per stage, from the stage records (event logs) of a results directory: attempts (starts counted on disk, the
    last one included), how often it was computed or failed, how often a driver saw its process lost, and `killed`:
    the attempts that ended neither computed nor failed (their process died)."""
    out: dict[str, dict[str, int]] = {}
    for e in store.events():
        if e.get("stage"):
            c = out.setdefault(e["stage"], {"attempts": 0, "computed": 0, "failed": 0, "lost": 0, "killed": 0})
            if e["event"] == "started":
                c["attempts"] = max(c["attempts"], int(e.get("attempt") or 1))
            elif e["event"] in c:
                c[e["event"]] += 1
    for c in out.values():
        c["killed"] = max(c["attempts"], c["lost"]) - c["computed"] - c["failed"]
    return out


def start_driver(grid: Path, out: Path, backend: str, env: dict, *extra: str) -> subprocess.Popen:
    """`editdecay grid run` as its own process (the way a user runs it), output to out.log beside `out`."""
    env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(f"{out}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "editdecay.cli", "grid", "run", str(grid), "--out", str(out),
                             "--backend", backend, "--threads", "1", "--json", *extra], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish_driver(p: subprocess.Popen, out: Path, timeout: float) -> tuple[dict | None, str]:
    """Wait for a driver to end by itself; (its JSON summary or None, its output). A driver still running after
    `timeout` seconds is killed and the test fails: it hangs."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_pids([p.pid])
        raise AssertionError(f"grid run did not end within {timeout:.0f} s:\n{Path(f'{out}.log').read_text()[-4000:]}")
    text = Path(f"{out}.log").read_text()
    start = text.rfind("\n{\n")
    try:
        return json.loads(text[start + 1:]), text
    except ValueError:
        return None, text


def wait_counted(store, plan, want: str, timeout: float = 180, where=None) -> tuple[str, int]:
    """(stage id, pid) of the first stage of kind `want` (or the stage with id `want`) whose start is counted on disk
    (it is mid-stage), computed by a process that `where(pid)` accepts (default: any)."""
    def running():
        for sid, st in plan.stages.items():
            if want not in (st.kind, sid) or store.is_done(sid):
                continue
            pid = (store.running_info(sid) or {}).get("pid")
            if pid and any(a.get("pid") == pid for a in store.attempts(sid)) and (where is None or where(pid)):
                return sid, pid
        return None

    return wait_for(running, timeout, f"a counted start of a {want} stage", every=0.05)
