"""Launchers: dry-run commands, remote scripts run in a sandbox, sweeps, pod sizes, mesh checks."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `launch/` is not an installed package; import it from the checkout
    sys.path.insert(0, str(ROOT))

from launch import common, slurm, sweep, tpu_pod, xpk  # noqa: E402
CONFIG = "configs/opt_125m.py:method=gated"


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def _fake_tools(tmp_path: Path, **scripts: str) -> Path:
    """A bin/ folder of executable bash scripts; `name=body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/bash\n{body}\n")
        p.chmod(0o755)
    return bin_dir


# ------------------------------------------------------------------------------------ TPU pods
def test_tpu_create_and_delete_dry_run(capsys):
    assert tpu_pod.main(["create", "--name", "qtx", "--zone", "us-central2-b", "--project", "p",
                         "--accelerator-type", "v4-32", "--dry-run"]) == 0
    assert tpu_pod.main(["delete", "--name", "qtx", "--zone", "us-central2-b", "--dry-run"]) == 0
    assert _lines(capsys) == [
        "gcloud compute tpus tpu-vm create qtx --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --zone=us-central2-b --project=p",
        "gcloud compute tpus tpu-vm delete qtx --zone=us-central2-b --quiet"]


def _run_remote_command(capsys, *extra: str) -> tuple[list[str], str]:
    argv = ["run", "--name", "qtx", "--zone", "z1", "--accelerator-type", "v4-32",
            "--config", CONFIG, "--workdir", "gs://b/r1", "--mesh", "data=-1,fsdp=4", "--dry-run",
            *extra, "--", "--config.optim.lr=1e-4", "config.name=a b; rm -rf /"]
    assert tpu_pod.main(argv) == 0
    (line,) = _lines(capsys)
    args = shlex.split(line)
    assert args[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qtx", "--worker=all"]
    (command,) = [a.removeprefix("--command=") for a in args if a.startswith("--command=")]
    assert "--zone=z1" in args
    return args, command


def test_tpu_run_dry_run_forwards_train_command_to_all_workers(capsys):
    _, command = _run_remote_command(capsys)
    subprocess.run(["bash", "-n", "-c", command], check=True)
    kill = command.index("sudo lsof -t /dev/accel*")
    start = command.index("nohup qtransformers train")
    assert kill < start and "rm -f /tmp/libtpu_lockfile" in command
    train = shlex.split(command[start:].split(" > ")[0])
    assert train == ["nohup", "qtransformers", "train", "--config", CONFIG, "--workdir",
                     "gs://b/r1", "--config.optim.lr=1e-4", "--config.name=a b; rm -rf /",
                     "--config.mesh.shape.data=-1", "--config.mesh.shape.fsdp=4"]
    assert 'logs/train-"$(hostname)".log' in command and "pkill" not in command


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_tpu_run_remote_command_in_a_sandbox(tmp_path, capsys):
    """Run the remote command with a fake trainer: nohup, pid file, one log per host, and a
    second start kills the first run."""
    _, command = _run_remote_command(capsys)
    bin_dir = _fake_tools(tmp_path, sudo="exit 0")
    trainer = bin_dir / "qtransformers"
    trainer.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                       "with open(os.path.expanduser('~/args.txt'), 'w') as f:\n"
                       "    f.write('\\n'.join(sys.argv[1:]))\n"
                       "print('training', flush=True)\ntime.sleep(60)\n")
    trainer.chmod(0o755)
    (tmp_path / "qtransformers").mkdir()
    venv = tmp_path / "qtransformers-venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = {**os.environ, "HOME": str(tmp_path)}
    logs = tmp_path / "qtransformers" / "logs"
    pids = []
    try:
        for _ in range(2):
            out = subprocess.run(["bash", "-c", command], env=env, capture_output=True,
                                 text=True, check=True, timeout=30).stdout
            assert "started pid" in out
            pids.append(int((logs / "train.pid").read_text()))
            assert _wait_for(lambda: (logs / f"train-{os.uname().nodename}.log").exists()
                             and "training" in (logs / f"train-{os.uname().nodename}.log")
                             .read_text())
            assert _alive(pids[-1])
        assert _wait_for(lambda: not _alive(pids[0])), "the second start must kill the first"
        assert (tmp_path / "args.txt").read_text().splitlines() == [
            "train", "--config", CONFIG, "--workdir", "gs://b/r1", "--config.optim.lr=1e-4",
            "--config.name=a b; rm -rf /", "--config.mesh.shape.data=-1", "--config.mesh.shape.fsdp=4"]
        assert [p.name for p in logs.glob("*.log")] == [f"train-{os.uname().nodename}.log"]
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_tpu_run_refuses_mesh_that_does_not_fit_the_pod(capsys):
    rc = tpu_pod.main(["run", "--name", "q", "--zone", "z", "--accelerator-type", "v4-32",
                       "--config", CONFIG, "--workdir", "gs://b/r", "--dry-run",
                       "--config.mesh.shape.data=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "multiplies to 8 but there are 16 devices" in err and "v4-32" in err


def test_tpu_setup_copies_local_checkout_and_pins_jax(capsys):
    assert tpu_pod.main(["setup", "--name", "q", "--zone", "z", "--repo", str(ROOT),
                         "--jax-version", "0.10.2", "--dry-run"]) == 0
    mkdir, scp, install = [shlex.split(line) for line in _lines(capsys)]
    assert "--worker=all" in mkdir and "--worker=all" in scp and "--worker=all" in install
    assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all"]
    assert str(ROOT / "pyproject.toml") in scp and str(ROOT / "launch") in scp
    assert str(ROOT / ".git") not in scp and "q:qtransformers" in scp
    command = install[install.index("ssh") + 3].removeprefix("--command=")
    assert '"jax[tpu]==0.10.2"' in command and "-e \"$HOME\"/qtransformers" in command


def test_tpu_setup_clones_git_url(capsys):
    assert tpu_pod.main(["setup", "--name", "q", "--zone", "z", "--dry-run",
                         "--repo", "https://github.com/org/qtransformers.git"]) == 0
    (line,) = _lines(capsys)
    assert "git clone --depth 1 https://github.com/org/qtransformers.git" in line


# ------------------------------------------------------------------------------------ XPK
def test_xpk_create_dry_run(capsys):
    assert xpk.main(["create", "--cluster", "c1", "--workload", "qtx-1", "--project", "p",
                     "--tpu-type", "v5litepod-64", "--num-slices", "2", "--docker-image",
                     "gcr.io/p/qtx:1", "--config", CONFIG, "--workdir", "gs://b/r",
                     "--mesh", "data=-1,fsdp=16", "--dry-run", "--", "config.name=a b"]) == 0
    assert xpk.main(["delete", "--cluster", "c1", "--workload", "qtx-1", "--dry-run"]) == 0
    assert xpk.main(["list", "--cluster", "c1", "--dry-run"]) == 0
    create, delete, list_ = [shlex.split(line) for line in _lines(capsys)]
    assert create[:-1] == ["xpk", "workload", "create", "--workload=qtx-1",
                           "--tpu-type=v5litepod-64", "--num-slices=2", "--cluster=c1",
                           "--project=p", "--docker-image=gcr.io/p/qtx:1"]
    assert shlex.split(create[-1].removeprefix("--command=")) == [
        "qtransformers", "train", "--config", CONFIG, "--workdir", "gs://b/r",
        "--config.name=a b", "--config.mesh.shape.data=-1", "--config.mesh.shape.fsdp=16"]
    assert delete == ["xpk", "workload", "delete", "--workload=qtx-1", "--cluster=c1"]
    assert list_ == ["xpk", "workload", "list", "--cluster=c1"]


def test_xpk_checks_mesh_against_all_slices_and_workload_names(capsys):
    base = ["create", "--cluster", "c", "--tpu-type", "v5p-128", "--num-slices", "2",
            "--docker-image", "i", "--config", "c.py", "--workdir", "gs://b", "--dry-run"]
    assert xpk.main([*base, "--workload", "w", "--mesh", "data=2,fsdp=64"]) == 0
    assert xpk.main([*base, "--workload", "w", "--mesh", "data=1,fsdp=64"]) == 2
    assert "there are 128 devices" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        xpk.main([*base, "--workload", "Bad_Name"])


# ------------------------------------------------------------------------------------ SLURM
def test_slurm_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(ROOT / "launch" / "slurm.sbatch")], check=True)


def test_slurm_dry_run_output_runs_end_to_end(tmp_path, capsys):
    """Run the printed plan with fake sbatch/srun/scontrol: the job starts one task per node."""
    log_dir = tmp_path / "logs"
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                       "--log-dir", str(log_dir), "--env-setup", "export FOO=bar",
                       "--config", CONFIG, "--workdir", "/shared/r1", "--mesh", "data=-1,fsdp=2",
                       "--dry-run", "--", "config.name=a b"]) == 0
    out = capsys.readouterr().out
    assert not log_dir.exists()  # a dry run writes nothing
    lines = out.splitlines()
    script = log_dir / "qtransformers.sbatch"
    assert lines[0] == f"mkdir -p {log_dir}"
    assert shlex.split(lines[-1]) == ["sbatch", "--parsable", str(script), CONFIG, "/shared/r1",
                                      "--config.name=a b", "--config.mesh.shape.data=-1",
                                      "--config.mesh.shape.fsdp=2"]
    for directive in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                      "--partition=gpu", f"--output={log_dir}/%x-%j.out"]:
        assert f"\n#SBATCH {directive}\n" in out
    bin_dir = _fake_tools(
        tmp_path, sbatch='cd "$(dirname "$0")/.."; printf "%s\\n" "$@" > sbatch_args; echo 42',
        scontrol="printf 'gpu7\\ngpu8\\n'",
        srun='while [[ $1 == --* ]]; do shift; done; for i in 0 1; do SLURM_PROCID=$i "$@"; done',
        train='echo "task $SLURM_PROCID $JAX_COORDINATOR_ADDRESS $JAX_LOCAL_DEVICE_IDS $FOO $*"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert subprocess.run(["bash", "-c", out], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "42"
    sbatch_args = (tmp_path / "sbatch_args").read_text().splitlines()
    env.update(SLURM_JOB_NODELIST="gpu[7-8]", SLURM_JOB_ID="9", SLURM_NNODES="2",
               QTX_ENTRYPOINT="train")
    job = subprocess.run(["bash", *sbatch_args[1:]], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    tail = (f"--config {CONFIG} --workdir /shared/r1 --config.distributed.initialization_timeout"
            "=300 --config.name=a b --config.mesh.shape.data=-1 --config.mesh.shape.fsdp=2")
    assert job[-2:] == [f"task {i} gpu7:8476 0,1,2,3 bar {tail}" for i in (0, 1)]
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)


def test_slurm_refuses_mesh_that_does_not_fit(capsys):
    assert slurm.main(["--nodes", "2", "--config", "c", "--workdir", "w", "--dry-run",
                       "--mesh", "data=3"]) == 2
    assert "there are 16 devices (2 nodes x 8 GPUs)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ missing tools
def test_missing_tools_give_install_hints_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tpu_pod.main(["delete", "--name", "q", "--zone", "z"]) == 2
    assert "Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" in capsys.readouterr().err
    assert xpk.main(["list", "--cluster", "c"]) == 2
    assert "pip install xpk" in capsys.readouterr().err
    assert slurm.main(["--config", "c", "--workdir", "w", "--log-dir", str(tmp_path / "l")]) == 2
    assert "SLURM" in capsys.readouterr().err and not (tmp_path / "l").exists()
    assert sweep.main(["--config", "c", "--workdir", "w", "--sweep", "seed=0,1"]) == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_missing_gcloud_as_a_script():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu_pod.py"), "create",
                           "--name", "q", "--zone", "z", "--accelerator-type", "v4-8"],
                          env={"PATH": ""}, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 2 and "`gcloud` was not found on PATH" in proc.stderr


# ------------------------------------------------------------------------------------ sweeps
def test_sweep_product_order_and_workdirs(capsys):
    axes = [sweep.parse_axis("config.model.softmax=vanilla,clipped"),
            sweep.parse_axis("--config.seed=0,1")]
    runs = sweep.expand(axes, "gs://b/sw/")
    assert [r.name for r in runs] == ["softmax=vanilla,seed=0", "softmax=vanilla,seed=1",
                                      "softmax=clipped,seed=0", "softmax=clipped,seed=1"]
    assert runs[3].workdir == "gs://b/sw/softmax=clipped,seed=1"
    assert runs[3].overrides == ("--config.model.softmax=clipped", "--config.seed=1")
    assert sweep.main(["--config", "c.py", "--workdir", "/w", "--sweep", "seed=0,1",
                       "--set", "config.optim.lr=1e-4", "--dry-run"]) == 0
    assert _lines(capsys)[1::2] == [
        f"qtransformers train --config c.py --workdir /w/seed={s} --config.optim.lr=1e-4 "
        f"--config.seed={s}" for s in (0, 1)]


def test_sweep_names_values_and_errors():
    assert sweep.short_names(["config.a.dropout", "config.b.dropout", "config.seed"]) == [
        "a.dropout", "b.dropout", "seed"]
    assert sweep.split_values("a,(1, 2),'x,y'") == ["a", "(1, 2)", "'x,y'"]
    with pytest.raises(ValueError, match="both map to workdir"):
        sweep.expand([("config.name", ["a b", "a_b"])], "/w")
    with pytest.raises(ValueError, match="swept twice"):
        sweep.short_names(["config.seed", "config.seed"])
    with pytest.raises(ValueError, match="repeated value"):
        sweep.parse_axis("seed=1,1")


def test_sweep_wraps_launchers(capsys):
    base = ["--config", "c.py", "--workdir", "gs://b/sw", "--sweep", "seed=0,1", "--dry-run"]
    assert sweep.main([*base, "--launcher", "xpk", "--", "--cluster", "c", "--workload", "qtx",
                       "--tpu-type", "v4-8", "--docker-image", "i"]) == 0
    creates = [shlex.split(x) for x in _lines(capsys) if x.startswith("xpk")]
    assert [c[3] for c in creates] == ["--workload=qtx-0", "--workload=qtx-1"]
    assert sweep.main([*base, "--launcher", "tpu", "--", "--name", "pod", "--zone", "z"]) == 0
    ssh = [x for x in _lines(capsys) if x.startswith("gcloud")]
    assert len(ssh) == 2 and all("--worker=all" in x and "| tee logs/" in x for x in ssh)
    assert "--workdir gs://b/sw/seed=1 --config.seed=1" in ssh[1]


def test_sweep_local_runs_sequentially(tmp_path, monkeypatch):
    bin_dir = _fake_tools(tmp_path, qtransformers=f'echo "$*" >> {tmp_path}/calls')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert sweep.main(["--config", "c.py", "--workdir", "/w", "--sweep", "a=1,2",
                       "--sweep", "b=x,y"]) == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [re.search(r"--workdir (\S+)", c).group(1) for c in calls] == [
        "/w/a=1,b=x", "/w/a=1,b=y", "/w/a=2,b=x", "/w/a=2,b=y"]


# ------------------------------------------------------------------------------------ sizes, mesh
@pytest.mark.parametrize("name,chips,hosts,devices", [
    ("v4-8", 4, 1, 4), ("v4-32", 16, 4, 16), ("v5p-128", 64, 16, 64), ("v3-32", 16, 4, 32),
    ("v5litepod-8", 8, 1, 8), ("v5litepod-4", 4, 1, 4), ("v5litepod-16", 16, 4, 16),
    ("v5litepod-64", 64, 16, 64), ("v6e-256", 256, 64, 256)])
def test_parse_tpu_type(name, chips, hosts, devices):
    s = common.parse_tpu_type(name)
    assert (s.chips, s.hosts, s.devices) == (chips, hosts, devices)


@pytest.mark.parametrize("name,match", [
    ("v4-12", "multiple of 8"), ("v5e-16", "v5litepod-16"), ("v5litepod-12", "power of two"),
    ("tpu-8", "unknown TPU type")])
def test_parse_tpu_type_errors(name, match):
    with pytest.raises(ValueError, match=match):
        common.parse_tpu_type(name)


def test_check_mesh_fits():
    assert common.check_mesh_fits({"data": 2, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4}
    assert common.check_mesh_fits({"data": -1, "fsdp": 4, "tensor": 1}, 32)["data"] == 8
    with pytest.raises(ValueError, match=r"multiplies to 6 but there are 8 devices \(v4-16\)"):
        common.check_mesh_fits({"data": 2, "fsdp": 3}, 8, "v4-16")
    with pytest.raises(ValueError, match="does not divide 8"):
        common.check_mesh_fits({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        common.check_mesh_fits({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="NAME=SIZE"):
        common.parse_mesh("data:2")


def test_overrides_are_normalized():
    assert [common.normalize_override(o) for o in ["--config.a=1", "config.b=2", "c.d=3"]] == [
        "--config.a=1", "--config.b=2", "--config.c.d=3"]
    with pytest.raises(ValueError):
        common.normalize_override("oops")
    with pytest.raises(SystemExit):
        common.parse_with_overrides(slurm.build_parser(), ["--config", "c", "--workdir", "w",
                                                           "--bogus"])
