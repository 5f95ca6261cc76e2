"""The cluster scripts (scripts/slurm_train.sh, scripts/torchrun_multinode.sh) without SLURM or GPUs.

Each script runs under bash with the SLURM variables set by hand, `srun` a stub that runs its arguments, and the
project's `.venv/bin/python` a stub that records the command line it was given. What the tests check is what the
scripts decide: which interpreter, which run folder, and which checkpoint a (re)started job resumes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "scripts" / "slurm_train.sh"
TORCHRUN = REPO / "scripts" / "torchrun_multinode.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

RECORD = '#!/bin/sh\nprintf "%s\\n" "$0" "$@" > "$ARGV_LOG"\n'


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    """A submit directory with a stub `.venv/bin/python`, and a bin/ folder holding a pass-through `srun`."""
    _executable(tmp_path / "submit" / ".venv" / "bin" / "python", RECORD)
    _executable(tmp_path / "bin" / "srun", '#!/bin/sh\nexec "$@"\n')
    return tmp_path / "submit"


def run_slurm(submit_dir: Path, job_id: int, *args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the batch script as SLURM would for job `job_id`; return the argv its python got and the process."""
    log = submit_dir.parent / f"argv-{job_id}.txt"
    log.unlink(missing_ok=True)
    env = {
        "PATH": f"{submit_dir.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(submit_dir.parent),
        "ARGV_LOG": str(log),
        "SLURM_JOB_ID": str(job_id),
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",
    }
    done = subprocess.run(["bash", str(SLURM), "configs/cifar10.yaml", *args], env=env, cwd=submit_dir.parent,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    argv = log.read_text().splitlines() if log.exists() else []
    return argv, done


def option(argv: list[str], name: str) -> str | None:
    """The value of the last `name` in argv (the one the CLI uses), or None."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def fake_checkpoint(path: Path, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint")
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_scripts_parse() -> None:
    for script in (SLURM, TORCHRUN):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script


def test_slurm_log_file_is_in_a_folder_that_exists() -> None:
    # SLURM opens --output before the script runs: a path under runs/ fails on a fresh clone.
    outputs = re.findall(r"^#SBATCH --output=(\S+)", SLURM.read_text(), flags=re.MULTILINE)
    assert outputs == ["%x-%j.out"]


def test_a_fresh_job_uses_the_venv_and_its_own_folder(submit_dir: Path) -> None:
    argv, done = run_slurm(submit_dir, 101)
    assert done.returncode == 0, done.stderr
    assert argv[0] == str(submit_dir / ".venv" / "bin" / "python")
    assert argv[1:5] == ["-m", "src.main", "fit", "--config"]
    assert option(argv, "--trainer.default_root_dir") == "runs/slurm-101"
    assert option(argv, "--trainer.devices") == "2" and option(argv, "--trainer.strategy") == "ddp"
    assert "--ckpt_path" not in argv


def test_a_requeued_job_resumes_its_own_run_only(submit_dir: Path) -> None:
    runs = submit_dir / "runs"
    # Another job's finished run and its hpc checkpoint, newer than anything of job 101's: never to be touched.
    fake_checkpoint(runs / "slurm-7" / "ddpm" / "version_0" / "checkpoints" / "last.ckpt")
    fake_checkpoint(runs / "slurm-7" / "hpc_ckpt_3.ckpt")
    fake_checkpoint(runs / "ddpm" / "version_0" / "checkpoints" / "last.ckpt")  # a run started without SLURM

    argv, done = run_slurm(submit_dir, 101)
    assert done.returncode == 0, done.stderr
    assert "--ckpt_path" not in argv, "a new job picked up another run's checkpoint"

    # Job 101 was preempted (SIGTERM writes last.ckpt) and requeued: it resumes from its own last.ckpt.
    last = fake_checkpoint(runs / "slurm-101" / "ddpm" / "version_0" / "checkpoints" / "last.ckpt", age_s=60)
    argv, done = run_slurm(submit_dir, 101)
    assert option(argv, "--ckpt_path") == "last" and option(argv, "--trainer.default_root_dir") == "runs/slurm-101"
    assert str(last.relative_to(submit_dir)) in done.stderr

    # Then it hit the time limit: Lightning saved hpc_ckpt_1.ckpt in the job's folder, the newest checkpoint.
    hpc = fake_checkpoint(runs / "slurm-101" / "hpc_ckpt_1.ckpt", age_s=30)
    argv, done = run_slurm(submit_dir, 101)
    assert option(argv, "--ckpt_path") == "hpc" and str(hpc.relative_to(submit_dir)) in done.stderr

    # A later SIGTERM wrote a newer last.ckpt than the hpc checkpoint: that one wins.
    fake_checkpoint(last)
    argv, _ = run_slurm(submit_dir, 101)
    assert option(argv, "--ckpt_path") == "last"

    # A second, unrelated job starts afresh in its own folder, whatever job 101 left behind.
    argv, done = run_slurm(submit_dir, 202)
    assert done.returncode == 0, done.stderr
    assert "--ckpt_path" not in argv and option(argv, "--trainer.default_root_dir") == "runs/slurm-202"


def test_a_requeue_replaces_the_checkpoint_given_for_the_first_start(submit_dir: Path) -> None:
    start = "runs/slurm-101/ddpm/version_0/checkpoints/last.ckpt"  # continue a finished run in a new job, 303
    argv, _ = run_slurm(submit_dir, 303, "--ckpt_path", start)
    assert option(argv, "--ckpt_path") == start and option(argv, "--trainer.default_root_dir") == "runs/slurm-303"
    fake_checkpoint(submit_dir / "runs" / "slurm-303" / "hpc_ckpt_1.ckpt")
    argv, _ = run_slurm(submit_dir, 303, "--ckpt_path", start)
    assert option(argv, "--ckpt_path") == "hpc"


def test_slurm_refuses_what_it_cannot_honour(submit_dir: Path) -> None:
    argv, done = run_slurm(submit_dir, 101, "--trainer.default_root_dir", "elsewhere")
    assert done.returncode == 2 and not argv
    assert done.stderr.strip().splitlines() == [
        "error: this script sets --trainer.default_root_dir to $RUNS_DIR/slurm-<job id>: set RUNS_DIR instead"
    ]
    (submit_dir / ".venv" / "bin" / "python").unlink()
    argv, done = run_slurm(submit_dir, 101)
    assert done.returncode == 2 and not argv and "run 'make install'" in done.stderr


def test_torchrun_uses_the_project_venv(tmp_path: Path) -> None:
    # A copy of the repository's layout: the script finds .venv from its own location, whatever the cwd.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(TORCHRUN, repo / "scripts" / TORCHRUN.name)
    (repo / "configs").mkdir()
    (repo / "configs" / "cifar10.yaml").write_text("{}\n")
    python = _executable(repo / ".venv" / "bin" / "python", RECORD)
    log = tmp_path / "argv.txt"
    env = {"PATH": os.environ["PATH"], "ARGV_LOG": str(log), "GPUS_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1"}
    done = subprocess.run(["bash", "repo/scripts/torchrun_multinode.sh", "repo/configs/cifar10.yaml", "--x", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = log.read_text().splitlines()
    assert argv[0] == str(python) and argv[1:3] == ["-m", "torch.distributed.run"]
    assert option(argv, "--nproc_per_node") == "4" and option(argv, "--node_rank") == "1"
    assert option(argv, "--config") == str(repo / "configs" / "cifar10.yaml")
    assert argv[-2:] == ["--x", "1"]
