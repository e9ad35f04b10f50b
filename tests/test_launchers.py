"""Launchers and preemption, with real processes on the CPU.

Each launcher script trains a few steps of glm-tiny with 2 processes. What one machine cannot
show under a real Slurm (test_slurm.py runs one real node) uses stand-ins: ``srun`` and
``scontrol`` on PATH that start two "nodes" with Slurm's variables, so the several-node
rendezvous, signal and requeue logic is what runs; ``sbatch`` recording a submission, for
the preprocessing script's arguments and its merge stage on a missing shard; and ``pdsh``
recording the command DeepSpeed sends to every node (test_ssh.py launches over a real sshd).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_glm.training.preemption import EXIT_REQUEUE
from tests.helpers import free_port, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = os.path.join(ROOT, "launchers")
ITERS = 12  # the runs stop at step 2 (HOLD) and resume to here
HOLD = {
    "MEGATRON_GLM_FAULT": "hold:2"
}  # the run waits after step 2 for the test's signal: never finishes first

FAKE_SRUN = r'''#!PYTHON
"""srun stand-in: start the tasks of this 'job' on localhost with Slurm's variables."""
import os, subprocess, sys
args = sys.argv[1:]
per_node = None
while args and args[0].startswith("-"):
    if args[0].startswith("--ntasks-per-node="):
        per_node = int(args[0].split("=")[1])
    args = args[1:]
nodes = int(os.environ["SLURM_NNODES"])
per_node = per_node or int(os.environ["SLURM_NTASKS"]) // nodes
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per_node))
        procs.append(subprocess.Popen(args, env=env))
with open(os.environ["FAKE_SLURM_PIDS"], "w") as f:
    f.write(" ".join(str(p.pid) for p in procs))
sys.exit(max(p.wait() for p in procs))
'''
FAKE_SCONTROL = r"""#!PYTHON
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:  # as long as a big job's list (past a pipe's buffer): a reader that
    # stops at the first line, like `| head -n 1`, makes this write fail, as it makes the real scontrol's
    print("\n".join(["127.0.0.1"] * int(os.environ["SLURM_NNODES"]) * 20000))
elif sys.argv[1] == "requeue":
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write("requeue " + sys.argv[2] + "\n")
"""


def env_for(data, save, **extra):
    prefix, model = data
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        PRESET="glm-tiny",
        DATA_PATH=prefix,
        TOKENIZER_ARGS=f"--tokenizer-model {model}",
        SEQ_LENGTH="64",
        MICRO_BATCH="2",
        GLOBAL_BATCH="4",
        TRAIN_ITERS=str(ITERS),
        LR="1e-3",
        PRECISION="fp32",
        SAVE_DIR=save,
        SAVE_INTERVAL="100",
        LOG_INTERVAL="1",
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
        PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
        EXTRA_ARGS=(
            f"--hidden-dropout 0 --attention-dropout 0 --split 100,0,0 "
            f"--data-cache-path {os.path.dirname(save)}/cache"
        ),
    )
    env.update(extra)
    return env


def run_launcher(script, env, timeout=600):
    """``bash launchers/{script}`` with ``env``: the completed run, its output captured."""
    return subprocess.run(
        ["bash", os.path.join(LAUNCHERS, script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(save):
    return {r["iteration"]: r["lm_loss"] for r in records(save)}


def wait_for_iteration(save, n, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"the run ended (status {proc.returncode}) before iteration {n}:\n{output[-6000:]}"
            )
        if (
            os.path.exists(os.path.join(save, "metrics.jsonl"))
            and max(losses(save), default=0) >= n
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"no iteration {n} within {timeout} s")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, data):
    """launchers/torchrun.sh, 2 processes (data parallel), uninterrupted: the reference for the Slurm runs."""
    save = str(tmp_path_factory.mktemp("torchrun") / "ckpt")
    return save, run_launcher("torchrun.sh", env_for(data, save, GPUS_PER_NODE="2"))


def test_torchrun_launcher_prints_its_command_and_trains(torchrun_run):
    save, result = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-m megatron_glm.training.torchrun --standalone --nproc_per_node 2" in result.stdout
    assert "x 2 data-parallel ranks" in result.stdout + result.stderr
    # rank 0 speaks
    assert " rank 0 INFO " in result.stdout and " rank 1 INFO " not in result.stdout
    assert sorted(losses(save)) == list(range(1, ITERS + 1))
    assert os.path.exists(os.path.join(save, f"iter_{ITERS:07d}", "meta.json"))


@pytest.mark.slow
def test_sigterm_saves_exits_for_requeue_and_the_restart_equals_an_uninterrupted_run(
    tmp_path, data, torchrun_run
):
    """One process: SIGTERM mid-run; then the same command again (no --load needed) finishes the run."""
    reference = str(tmp_path / "ref" / "ckpt")
    env = env_for(data, reference)
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.training.pretrain",
        "--preset",
        "glm-tiny",
        "--data-path",
        env["DATA_PATH"],
        *env["TOKENIZER_ARGS"].split(),
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(ITERS),
        "--lr",
        "1e-3",
        "--log-interval",
        "1",
        *env["EXTRA_ARGS"].split(),
    ]
    done = subprocess.run(
        cmd + ["--save", reference], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    save = str(tmp_path / "preempted" / "ckpt")
    proc = subprocess.Popen(
        cmd + ["--save", save],
        env={**env, **HOLD},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_iteration(save, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    stopped = max(losses(save))
    assert stopped == 2 and "stopping after iteration 2 (SIGTERM)" in out
    assert os.listdir(save) and os.path.exists(
        os.path.join(save, f"iter_{stopped:07d}", "meta.json")
    )

    again = subprocess.run(
        cmd + ["--save", save], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {save}/iter_{stopped:07d}" in again.stdout + again.stderr
    assert losses(save) == losses(reference), "bitwise the uninterrupted run"


def fake_slurm(tmp_path, nodes, tasks):
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text.replace("#!PYTHON", "#!" + sys.executable))
        (bin_dir / name).chmod(0o755)
    return dict(
        PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(tasks),
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=ROOT,
        FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
        FAKE_SLURM_PIDS=str(tmp_path / "pids"),
    )


@pytest.mark.slow
def test_slurm_torchrun_script_rendezvous_preemption_and_requeue(tmp_path, data, torchrun_run):
    """Two 'nodes' (one torchrun each) meet at the c10d rendezvous; USR1 to the batch script -> stop file ->
    every rank saves after the same step -> requeue; the requeued job finishes like the uninterrupted run."""
    reference, ref_result = torchrun_run
    assert ref_result.returncode == 0
    save = str(tmp_path / "ckpt")
    env = env_for(
        data, save, GPUS_PER_NODE="1", RDZV_PORT=str(free_port()), **fake_slurm(tmp_path, 2, 2)
    )
    script = os.path.join(LAUNCHERS, "slurm_torchrun.sbatch")
    proc = subprocess.Popen(
        ["bash", script],
        env={**env, **HOLD},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_iteration(save, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in out and "--nnodes 2" in out
    # a stop for a requeue reads as one: no crash report from torchrun
    assert "stopped to be requeued (exit 75)" in out
    assert "FAILED" not in out and "Traceback" not in out and "ChildFailedError" not in out
    assert open(env["FAKE_SLURM_LOG"]).read() == "requeue 4242\n"
    stopped = max(losses(save))
    assert stopped == 2 and os.path.exists(os.path.join(save, "iter_0000002", "meta.json"))

    os.remove(env["FAKE_SLURM_LOG"])
    again = subprocess.run(
        ["bash", script],
        env={**env, "RDZV_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-4000:]
    assert not os.path.exists(env["FAKE_SLURM_LOG"]), "a finished job is not requeued"
    ours, ref = losses(save), losses(reference)
    assert sorted(ours) == sorted(ref)
    for it in ref:
        assert ours[it] == pytest.approx(ref[it], rel=1e-5)


@pytest.mark.slow
def test_mpirun_launcher(tmp_path, data):
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, NP="2", MPIRUN="mpiexec", TRAIN_ITERS="2")
    env.pop("MASTER_PORT")
    result = run_launcher("mpirun.sh", env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (
        "+ mpiexec -n 2" in result.stdout
        and "x 2 data-parallel ranks" in result.stdout + result.stderr
    )
    assert sorted(losses(save)) == [1, 2]


@pytest.mark.slow
def test_deepspeed_launcher_on_localhost(tmp_path, data):
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, NUM_GPUS="2", TRAIN_ITERS="2")
    result = run_launcher("deepspeed.sh", env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "+ deepspeed --launcher pdsh" in result.stdout
    assert "x 2 data-parallel ranks" in result.stdout + result.stderr
    assert sorted(losses(save)) == [1, 2]


def test_deepspeed_launcher_forwards_the_cluster_variables_to_every_node(tmp_path, data):
    """Two nodes by hostfile: DeepSpeed's real runner builds the pdsh command; stand-in ssh and pdsh record it,
    to read the exports it sends to every node (test_ssh.py runs the launch itself over a real sshd)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")  # the runner's passwordless-ssh check
    (bin_dir / "pdsh").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/pdsh.args\n")
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    save = str(tmp_path / "ckpt")
    cluster = {
        "NCCL_SOCKET_IFNAME": "ib0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "GLOO_SOCKET_IFNAME": "eth0",
        "OMP_NUM_THREADS": "4",
        "WANDB_MODE": "offline",
    }
    env = env_for(data, save, HOSTFILE=str(hostfile), MASTER_ADDR="node1", **cluster)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("DS_ENV_FILE", None)
    result = run_launcher("deepspeed.sh", env, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(os.path.join(save, ".deepspeed_env")) as f:
        written = dict(line.rstrip("\n").split("=", 1) for line in f)
    assert cluster.items() <= written.items()
    with open(tmp_path / "pdsh.args") as f:
        command = f.read()
    assert "-w\nnode1,node2\n" in command
    for key, value in cluster.items():  # what every node's shell runs before the launch
        assert f"export {key}={value};" in command


def test_a_one_line_error_stays_one_line_under_torchrun(tmp_path, data):
    """An impossible layout under launchers/torchrun.sh: the workers' one line and their status, no crash report."""
    env = env_for(data, str(tmp_path / "ckpt"), GPUS_PER_NODE="2")
    env["EXTRA_ARGS"] += " --tensor-model-parallel-size 3"
    result = run_launcher("torchrun.sh", env, timeout=300)
    assert result.returncode == 1
    assert "world size 2 is not a multiple of tensor 3" in result.stderr, result.stderr
    for noise in ("FAILED", "Traceback", "ChildFailedError", "exitcode"):
        assert noise not in result.stdout + result.stderr, noise


def test_a_crash_under_torchrun_keeps_torchruns_report(tmp_path):
    """A worker that raises: glm-torchrun shows torchrun's report with the worker's traceback, and fails."""
    script = tmp_path / "worker.py"
    script.write_text(
        "from torch.distributed.elastic.multiprocessing.errors import record\n"
        "@record\n"
        "def main():\n"
        "    raise RuntimeError('a genuine bug')\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.torchrun", "--standalone"]
        + ["--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "RuntimeError: a genuine bug" in result.stderr


def test_launchers_name_missing_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "SAVE_DIR", "GLM_CONFIG")}
    result = run_launcher("torchrun.sh", env)
    assert result.returncode != 0 and "set DATA_PATH" in result.stderr
    bad = tmp_path / "bad.env"
    bad.write_text("PRECISION=fp8\n")
    result = run_launcher(
        "torchrun.sh", {**env, "GLM_CONFIG": str(bad), "DATA_PATH": "x", "SAVE_DIR": "y"}
    )
    assert result.returncode == 2 and "PRECISION=fp8; use bf16, fp16 or fp32" in result.stderr


@pytest.mark.slow
def test_the_launchers_run_glm_finetune_and_resume_it(tmp_path, data):
    """GLM_COMMAND=finetune: the same launcher, glm-finetune's module and the task's flags; run again, the job
    finds its own checkpoint in SAVE_DIR and resumes it rather than starting over from --load."""
    from tests.helpers import write_jsonl

    words = ["file", "name", "value", "object"]
    rows = [
        {"text": f"Return the [MASK] of item {k}.", "choices": words[:2], "label": k % 2}
        for k in range(16)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    save = str(tmp_path / "ckpt")
    env = env_for(
        data,
        save,
        GLM_COMMAND="finetune",
        GPUS_PER_NODE="2",
        FINETUNE_ARGS=f"--task classification --train-data {train} --valid-data {train}",
        EXTRA_ARGS="--hidden-dropout 0 --attention-dropout 0 --eval-interval 6",
        TRAIN_ITERS="6",
        SAVE_INTERVAL="3",
    )
    first = run_launcher("torchrun.sh", {**env, "MEGATRON_GLM_FAULT": "iteration:4"})
    assert (
        first.returncode != 0
        and "-m megatron_glm.training.finetune --preset glm-tiny --task" in first.stdout
    )
    assert "--data-path" not in first.stdout and os.path.isdir(os.path.join(save, "iter_0000003"))
    second = run_launcher("torchrun.sh", env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at iteration 3" in second.stdout
    assert os.path.exists(os.path.join(save, "finetune_results.json"))
    missing = {k: v for k, v in env.items() if k != "FINETUNE_ARGS"}
    result = run_launcher("torchrun.sh", missing)
    assert result.returncode != 0 and "set FINETUNE_ARGS" in result.stderr


FAKE_SBATCH = r'''#!PYTHON
"""sbatch stand-in: record the submission (one JSON line) instead of queueing it; --test-only passes (a real
Slurm's refusal is test_slurm.py's)."""
import json, os, sys
if "--test-only" in sys.argv:
    sys.exit(print("sbatch: Job 778 to start at now", file=sys.stderr))
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print("Submitted batch job 777")
'''


def split_corpus(tmp_path, corpus, spm_model) -> None:
    """The corpus as three files in ``raw/`` (an array's three shards), and one glm-preprocess run over them
    (``single_text_document``), the reference a merge must equal byte for byte."""
    from megatron_glm.data.tokenizer import TokenizerSpec
    from megatron_glm.data_prep.preprocess import preprocess

    lines = open(corpus[0], "rb").read().splitlines(keepends=True)
    (tmp_path / "raw").mkdir()
    for i, part in enumerate((lines[:500], lines[500:1100], lines[1100:])):
        (tmp_path / "raw" / f"part{i}.jsonl").write_bytes(b"".join(part))
    preprocess(
        [str(tmp_path / "raw")],
        str(tmp_path / "single"),
        TokenizerSpec(model=spm_model),
        append_eod=True,
    )


def test_slurm_preprocess_array_then_merge_equals_one_run(tmp_path, corpus, spm_model):
    """An array of 3 tasks, each its shard; task 0 submits the merge after the array (afterany); the merged
    dataset is byte-identical to one glm-preprocess run."""
    import json

    split_corpus(tmp_path, corpus, spm_model)
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.replace("#!PYTHON", "#!" + sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        INPUT=str(tmp_path / "raw"),
        OUTPUT_PREFIX=str(tmp_path / "out" / "corpus"),
        TOKENIZER_ARGS=f"--tokenizer-model {spm_model}",
        PREPROCESS_ARGS="--append-eod",
        SLURM_SUBMIT_DIR=ROOT,
        SLURM_ARRAY_JOB_ID="900",
        SLURM_ARRAY_TASK_COUNT="3",
        SLURM_ARRAY_TASK_MIN="0",
        SLURM_ARRAY_TASK_MAX="2",
        SLURM_CPUS_PER_TASK="1",  # sbatch --array=0-2 --cpus-per-task=1
        FAKE_SLURM_LOG=str(log),
        PYTHON=sys.executable,
    )
    (tmp_path / "out").mkdir()
    script = os.path.join(LAUNCHERS, "slurm_preprocess.sbatch")
    for task in (2, 0, 1):  # array tasks run in any order
        result = subprocess.run(
            ["bash", script],
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "--shard-index " + str(task) in result.stdout
    submissions = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(submissions) == 1, "only task 0 submits the merge"
    merge = submissions[0]
    assert "--dependency=afterany:900" in merge and merge[-1].endswith("slurm_preprocess.sbatch")
    # one task, and no more CPUs than the array's tasks got (not the header's 32, unschedulable on small nodes)
    assert "--ntasks=1" in merge and "--cpus-per-task=1" in merge
    export = next(a for a in merge if a.startswith("--export="))[len("--export=") :].split(",")
    stage = dict(kv.split("=", 1) for kv in export if "=" in kv)
    assert "ALL" in export and stage == {
        "GLM_PREPROCESS_STAGE": "merge",
        "NUM_SHARDS": "3",
        "ARRAY_JOB_ID": "900",
    }
    result = subprocess.run(
        ["bash", merge[-1]], env={**env, **stage}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for ext in (".bin", ".idx"):
        assert (tmp_path / "out" / f"corpus_text_document{ext}").read_bytes() == (
            tmp_path / f"single_text_document{ext}"
        ).read_bytes()
    # a missing shard: the merge says which stage to rerun, and writes nothing
    os.remove(tmp_path / "out" / "corpus_text_document.bin")
    os.remove(tmp_path / "out" / "corpus_text_document.idx")
    os.remove(next((tmp_path / "out").glob("*.shard-00001-of-00003.idx")))
    result = subprocess.run(
        ["bash", merge[-1]], env={**env, **stage}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "found 2 of 3 shards" in result.stderr
    assert (
        "array task(s) 1 failed" in result.stderr and "scontrol requeue 900_<task>" in result.stderr
    )
    assert not (tmp_path / "out" / "corpus_text_document.bin").exists()
