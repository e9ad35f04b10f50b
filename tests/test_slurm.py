"""The Slurm launchers under a real Slurm: Debian's munge, slurmctld and slurmd, started here on this one node.

`.ci/run` installs them (slurm-wlm, munge) when they are absent; slurmd runs jobs as their users,
so it needs root. The several-node cases (two torchrun agents meeting at a rendezvous) stay on
the stand-ins in test_launchers.py: one machine is one Slurm node.
"""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port
from tests.test_launchers import (
    HOLD,
    ITERS,
    LAUNCHERS,
    env_for,
    losses,
    split_corpus,
    torchrun_run,
)

__all__ = ["torchrun_run"]  # the uninterrupted reference run, a fixture of test_launchers

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def _which(tool):
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)), None
    )


@dataclasses.dataclass
class Slurm:
    env: dict
    root: str

    def run(self, *cmd, **kw):
        return subprocess.run(
            [_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, **kw
        )

    def submit(self, script, env, *options) -> str:
        """``sbatch`` from the cluster's folder (jobs write their default logs there, never in the checkout); the
        job id."""
        done = subprocess.run(
            [_which("sbatch"), "--parsable", "--open-mode=append", *options, script],
            env={**env, **self.env, "LAUNCHERS": LAUNCHERS},
            cwd=self.root,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def job(self, job_id) -> dict:
        """``scontrol show job``'s fields (the first task's, for an array)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout.splitlines()
        return dict(f.split("=", 1) for f in out[0].split() if "=" in f) if out else {}

    def wait(self, job_id, states=("COMPLETED",), timeout=600) -> dict:
        """Poll until the job is in one of ``states``."""
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} - set(
                states
            ):
                raise AssertionError(f"job {job_id} ended {state}: {info}")
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not {states} within {timeout} s: {self.job(job_id)}")


def _write_conf(root: str) -> str:
    host = socket.gethostname()
    conf = os.path.join(root, "slurm.conf")
    for d in ("state", "spool"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    settings = {
        "ClusterName": "glmtest",
        "SlurmctldHost": host,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "AuthType": "auth/munge",
        "StateSaveLocation": f"{root}/state",
        "SlurmdSpoolDir": f"{root}/spool",
        "SlurmctldPidFile": f"{root}/slurmctld.pid",
        "SlurmdPidFile": f"{root}/slurmd.pid",
        "SlurmctldLogFile": f"{root}/slurmctld.log",
        "SlurmdLogFile": f"{root}/slurmd.log",
        # no cgroups here: plain process tracking, no task binding, no accounting
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "ReturnToService": 2,
        "MpiDefault": "none",
        "JobRequeue": 1,
        # a requeued job waits until its old credentials expire (two minutes by default): 10 s here
        "AuthInfo": "cred_expire=10",
        # slurm_srun.sbatch derives its port from the job id (20000 + id % 20000): ids from 10000 keep it clear
        # of the tests' own ports (tests/helpers.free_port hands out 20000 and up)
        "FirstJobId": 10000,
    }
    with open(conf, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in settings.items())
        f.write(f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN\n")
        f.write("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
    return conf


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (.ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd runs jobs as their users: it needs root")
    root = str(tmp_path_factory.mktemp("slurm"))
    conf = _write_conf(root)
    env = {**os.environ, "SLURM_CONF": conf}
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run([_which("munged"), "--force"], check=True, capture_output=True)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([_which(daemon), "-f", conf], env=env, check=True, capture_output=True)
    cluster = Slurm(env, root)
    end = time.time() + 60
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%t").stdout:
        assert time.time() < end, open(f"{root}/slurmctld.log").read()[-3000:]
        time.sleep(0.5)
    yield cluster
    cluster.run("scancel", "--full", "--user", "root")
    for daemon in ("slurmd", "slurmctld"):
        try:
            os.kill(int(open(f"{root}/{daemon}.pid").read()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def wait_for_iteration(save, n, slurm, job_id, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if (
            os.path.exists(os.path.join(save, "metrics.jsonl"))
            and max(losses(save), default=0) >= n
        ):
            return
        assert slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), slurm.job(job_id)
        time.sleep(0.5)
    raise AssertionError(f"no iteration {n} within {timeout} s")


def test_torchrun_script_trains_stops_on_usr1_is_requeued_and_finishes(
    slurm, tmp_path, data, torchrun_run
):
    """sbatch slurm_torchrun.sbatch; at step 2 Slurm's USR1 to the batch script: every rank saves, the script
    requeues the job, Slurm starts it again, it resumes and finishes exactly as the uninterrupted run."""
    reference, ref_result = torchrun_run
    assert ref_result.returncode == 0
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, GPUS_PER_NODE="2", RDZV_PORT=str(free_port()), **HOLD)
    log = str(tmp_path / "job.out")
    job = slurm.submit(
        os.path.join(LAUNCHERS, "slurm_torchrun.sbatch"),
        env,
        "--gpus-per-node=0",  # this node has no GPUs; the script's other requests stand
        f"--cpus-per-task={os.cpu_count()}",
        f"--output={log}",
    )
    wait_for_iteration(save, 2, slurm, job)
    assert slurm.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    info = slurm.wait(job)
    assert int(info["Restarts"]) == 1 and info["ExitCode"] == "0:0"
    out = open(log).read()
    assert "requeueing job " + job in out and "stopped to be requeued (exit 75)" in out
    assert "FAILED" not in out and "Traceback" not in out
    ours, ref = losses(save), losses(reference)
    assert sorted(ours) == list(range(1, ITERS + 1))
    for it in ref:
        assert ours[it] == pytest.approx(ref[it], rel=1e-5)


def test_an_external_scontrol_requeue_resumes_and_finishes(slurm, tmp_path, data, torchrun_run):
    """An operator's (or Slurm's own) `scontrol requeue` of the running job: Slurm terminates every process of
    the job (SIGTERM, then SIGKILL after KillWait) and queues it again. The ranks save on the SIGTERM; the
    restart resumes from that checkpoint and finishes exactly as the uninterrupted run."""
    reference, _ = torchrun_run
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, GPUS_PER_NODE="2", RDZV_PORT=str(free_port()), **HOLD)
    log = str(tmp_path / "job.out")
    job = slurm.submit(
        os.path.join(LAUNCHERS, "slurm_torchrun.sbatch"),
        env,
        "--gpus-per-node=0",
        f"--cpus-per-task={os.cpu_count()}",
        f"--output={log}",
        "--open-mode=append",  # the restart's output follows the first run's
    )
    wait_for_iteration(save, 2, slurm, job)
    assert slurm.run("scontrol", "requeue", job).returncode == 0
    info = slurm.wait(job)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "0:0", info
    out = open(log).read()
    assert "resumed from" in out, out[-4000:]
    assert "glm-torchrun: stopped by SIGTERM" in out and "Traceback" not in out, out[-4000:]
    assert "iter_0000002" in os.listdir(save), "the SIGTERM's save"
    ours, ref = losses(save), losses(reference)
    assert sorted(ours) == list(range(1, ITERS + 1))
    for it in ref:
        assert ours[it] == pytest.approx(ref[it], rel=1e-5)


def test_srun_script_two_tasks_stop_on_usr1_are_requeued_and_finish(
    slurm, tmp_path, data, torchrun_run
):
    """sbatch slurm_srun.sbatch, two tasks; USR1 to every task at step 2: they save together and exit 75, the
    script requeues the job, and the restart resumes and finishes as the uninterrupted run."""
    reference, _ = torchrun_run
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, **HOLD)
    env.pop("MASTER_PORT")
    log = str(tmp_path / "job.out")
    job = slurm.submit(
        os.path.join(LAUNCHERS, "slurm_srun.sbatch"),
        env,
        "--ntasks-per-node=2",
        "--gpus-per-task=0",
        "--cpus-per-task=1",
        f"--output={log}",
    )
    wait_for_iteration(save, 2, slurm, job)
    assert (
        slurm.run("scancel", "--signal=USR1", job).returncode == 0
    )  # Slurm's warning, to every task
    info = slurm.wait(job)
    assert int(info["Restarts"]) == 1 and info["ExitCode"] == "0:0"
    out = open(log).read()
    assert "x 2 data-parallel ranks" in out and "requeueing job " + job in out, out[-3000:]
    ours, ref = losses(save), losses(reference)
    assert sorted(ours) == list(range(1, ITERS + 1))
    for it in ref:
        assert ours[it] == pytest.approx(ref[it], rel=1e-5)


def preprocess_env(tmp_path, spm_model, **settings) -> dict:
    """slurm_preprocess.sbatch's settings: the inputs in ``raw/``, the output under ``out/``."""
    return {
        **os.environ,
        "INPUT": str(tmp_path / "raw"),
        "OUTPUT_PREFIX": str(tmp_path / "out" / "corpus"),
        "TOKENIZER_ARGS": f"--tokenizer-model {spm_model}",
        "PYTHON": sys.executable,
        **settings,
    }


def test_preprocess_array_and_its_merge_equal_one_run(slurm, tmp_path, corpus, spm_model):
    """sbatch --array=0-2 --cpus-per-task=1: three shards, then the merge job task 0 submits (one task, one CPU)
    once they all succeed; the merged dataset is byte-identical to one glm-preprocess run."""
    split_corpus(tmp_path, corpus, spm_model)
    (tmp_path / "out").mkdir()
    env = preprocess_env(tmp_path, spm_model, PREPROCESS_ARGS="--append-eod")
    array = slurm.submit(
        os.path.join(LAUNCHERS, "slurm_preprocess.sbatch"),
        env,
        "--array=0-2",
        "--cpus-per-task=1",
        f"--output={tmp_path}/array-%a.out",
    )
    end = time.time() + 300
    while True:  # the merge is a job of its own, submitted by task 0
        merges = slurm.run("squeue", "-h", "-n", "glm-merge-datasets", "-o", "%i").stdout.split()
        done = os.path.exists(tmp_path / "out" / "corpus_text_document.idx")
        if done and not merges:
            break
        assert time.time() < end, [open(p).read() for p in tmp_path.glob("*.out")]
        time.sleep(0.5)
    assert array
    # task 0 printed the merge's submission: one task on one CPU, as much as an array task had
    merge = open(tmp_path / "array-0.out").read().split("Submitted batch job ")[1].split()[0]
    info = slurm.job(merge)
    assert (info["NumTasks"], info["NumCPUs"], info["JobState"]) == ("1", "1", "COMPLETED"), info
    for ext in (".bin", ".idx"):
        merged = (tmp_path / "out" / f"corpus_text_document{ext}").read_bytes()
        assert merged == (tmp_path / f"single_text_document{ext}").read_bytes(), ext


def test_a_merge_no_node_can_run_is_reported_not_left_pending(slurm, tmp_path, corpus, spm_model):
    """Slurm accepts a job no node can meet and leaves it PENDING for good (PartitionConfig): task 0 asks the
    scheduler first (sbatch --test-only) and, refused, says so in its log and submits nothing; its shard is
    written all the same."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part.jsonl").write_bytes(open(corpus[0], "rb").read()[:20000])
    (tmp_path / "out").mkdir()
    # more memory than any node has
    env = preprocess_env(tmp_path, spm_model, MERGE_SBATCH_ARGS="--mem=100T")
    array = slurm.submit(
        os.path.join(LAUNCHERS, "slurm_preprocess.sbatch"),
        env,
        "--array=0-0",
        "--cpus-per-task=1",
        f"--output={tmp_path}/array-%a.out",
    )
    slurm.wait(f"{array}_0", timeout=300)
    log = (tmp_path / "array-0.out").read_text()
    assert "cannot be scheduled on this cluster" in log and "--mem=100T" in log, log
    assert "Requested node configuration is not available" in log, log
    assert "Submitted batch job" not in log, log
    merges = slurm.run("squeue", "-h", "-n", "glm-merge-datasets", "-o", "%i").stdout.split()
    assert merges == [], "nothing left pending"
    assert list((tmp_path / "out").glob("*.shard-00000-of-00001.idx"))


def test_a_failed_array_task_is_named_by_the_merge_and_a_rerun_finishes(
    slurm, tmp_path, corpus, spm_model
):
    """One input is damaged: the merge runs once the array has ended and names the task that failed (with
    afterok it would wait for good); with the file mended, requeueing that task and submitting the merge again
    gives what one run gives."""
    import gzip

    from megatron_glm.data.tokenizer import TokenizerSpec
    from megatron_glm.data_prep.preprocess import preprocess

    lines = open(corpus[0], "rb").read().splitlines(keepends=True)
    (tmp_path / "raw").mkdir()
    for i, part in enumerate((lines[:500], lines[500:1100], lines[1100:])):
        # a compressed file goes whole to one task
        (tmp_path / "raw" / f"part{i}.jsonl.gz").write_bytes(gzip.compress(b"".join(part)))
    preprocess([str(tmp_path / "raw")], str(tmp_path / "single"), TokenizerSpec(model=spm_model))
    good = (tmp_path / "raw" / "part1.jsonl.gz").read_bytes()
    # damaged in the middle, its size kept: the tasks split the inputs by size, so the rerun's share must match
    middle = len(good) // 2
    bad = good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 64]) + good[middle + 64 :]
    (tmp_path / "raw" / "part1.jsonl.gz").write_bytes(bad)
    (tmp_path / "out").mkdir()
    env = preprocess_env(tmp_path, spm_model)
    script = os.path.join(LAUNCHERS, "slurm_preprocess.sbatch")
    array = slurm.submit(
        script, env, "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/array-%a.out"
    )
    first, end = tmp_path / "array-0.out", time.time() + 120
    while not first.exists() or "Submitted batch job " not in first.read_text(errors="ignore"):
        assert time.time() < end
        time.sleep(0.5)
    merge = first.read_text().split("Submitted batch job ")[1].split()[0]
    info = slurm.wait(merge, states=("FAILED", "COMPLETED"))
    log = open(info["StdOut"]).read()
    # the task that read part1 failed (which one depends on how the inputs' sizes split): the merge names it
    failed = [i for i in range(3) if "error:" in (tmp_path / f"array-{i}.out").read_text()]
    assert len(failed) == 1 and info["JobState"] == "FAILED", log
    assert (
        f"array task(s) {failed[0]} failed" in log and f"scontrol requeue {array}_<task>" in log
    ), log
    assert "sbatch --ntasks=1 --cpus-per-task=1" in log

    (tmp_path / "raw" / "part1.jsonl.gz").write_bytes(good)
    assert slurm.run("scontrol", "requeue", f"{array}_{failed[0]}").returncode == 0
    slurm.wait(f"{array}_{failed[0]}", timeout=120)
    again = slurm.submit(
        script,
        {**env, "GLM_PREPROCESS_STAGE": "merge", "NUM_SHARDS": "3"},
        "--ntasks=1",
        "--cpus-per-task=1",  # as the message says: the header asks for 32
        f"--output={tmp_path}/merge-again.out",
    )
    slurm.wait(again, timeout=120)
    for ext in (".bin", ".idx"):
        merged = (tmp_path / "out" / f"corpus_text_document{ext}").read_bytes()
        assert merged == (tmp_path / f"single_text_document{ext}").read_bytes(), ext
