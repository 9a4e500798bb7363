"""Cloud TPU VM pod launcher: create, set up, run on every host, stop, tail logs, delete.

    python3 launch/tpu_pod.py create --name N --zone Z --accelerator-type v4-32 [--spot]
    python3 launch/tpu_pod.py setup  --name N --zone Z --repo GIT_URL_OR_PATH [--jax-version X]
    python3 launch/tpu_pod.py run    --name N --zone Z --config C --workdir gs://B/D
                                     [--accelerator-type T] [--mesh data=-1,fsdp=4] [-- OVERRIDES]
    python3 launch/tpu_pod.py stop|tail|delete --name N --zone Z

Every remote command goes to `--worker=all`: jax.distributed.initialize() waits for all hosts,
so a run started on one worker only hangs. `run` first kills leftovers that hold the TPU (the
previous run's pid, processes holding /dev/accel* or /dev/vfio/*, /tmp/libtpu_lockfile), then
starts the train command under nohup with one log per host (DIR/logs/train-HOSTNAME.log).
Add --dry-run to print the gcloud commands instead of running them.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402

# Default TPU VM software versions per generation (gcloud --version).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}
# Files and folders not copied to the hosts when --repo is a local path.
# (also anything starting with "." or "workdir", and *.egg-info).
COPY_EXCLUDES = {"__pycache__", "build", "dist", "runs", "slurm-logs"}
KILL_TPU_HOLDERS = ("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; "
                    "sudo rm -f /tmp/libtpu_lockfile")


def remote_path(path: str) -> str:
    """Shell text for a path on the hosts: relative paths (and ~/...) are under $HOME."""
    if path.startswith("~/"):
        path = path[2:]
    return shlex.quote(path) if path.startswith("/") else f'"$HOME"/{shlex.quote(path)}'


def _dquote(word: str) -> str:
    """Quote a pip requirement for the remote shell, in double quotes when that is safe."""
    return f'"{word}"' if re.fullmatch(r"[\w\[\].,=<>~-]+", word) else shlex.quote(word)


def _gcloud(ns: argparse.Namespace, *args: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={ns.zone}"]
    return cmd + ([f"--project={ns.project}"] if ns.project else [])


def ssh_all(ns: argparse.Namespace, remote_command: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` (always all workers)."""
    return _gcloud(ns, "ssh", ns.name, "--worker=all", f"--command={remote_command}")


def is_git_url(repo: str) -> bool:
    """True for git remotes (https://, ssh://, git@host:...); False for local paths."""
    return "://" in repo or (repo.startswith("git@") and ":" in repo)


def plan_create(ns: argparse.Namespace) -> list[common.Step]:
    """`gcloud ... tpu-vm create` for the requested accelerator type and runtime."""
    tpu = common.parse_tpu_type(ns.accelerator_type)
    version = ns.runtime_version or RUNTIME_VERSIONS[tpu.generation]
    cmd = _gcloud(ns, "create", ns.name, f"--accelerator-type={ns.accelerator_type}",
                  f"--version={version}")
    return [cmd + (["--spot"] if ns.spot else [])]


def plan_setup(ns: argparse.Namespace) -> list[common.Step]:
    """Copy or clone the project on every host, then install it with jax[tpu] into a venv."""
    steps: list[common.Step] = []
    rdir = remote_path(ns.remote_dir)
    if is_git_url(ns.repo):
        branch = f"--branch {shlex.quote(ns.branch)} " if ns.branch else ""
        fetch = (f"(git clone --depth 1 {branch}{shlex.quote(ns.repo)} {rdir} || "
                 f"git -C {rdir} pull --ff-only) && ")
    else:
        root = os.path.abspath(ns.repo)
        if not os.path.isdir(root):
            raise ValueError(f"--repo {ns.repo!r} is neither a git URL nor a local directory")
        sources = [os.path.join(root, e) for e in sorted(os.listdir(root))
                   if e not in COPY_EXCLUDES and not e.startswith((".", "workdir"))
                   and not e.endswith(".egg-info")]
        steps.append(ssh_all(ns, f"mkdir -p {rdir}"))
        steps.append(_gcloud(ns, "scp", "--recurse", "--worker=all", *sources,
                             f"{ns.name}:{ns.remote_dir.removeprefix('~/')}"))
        fetch = ""
    venv = remote_path(ns.venv)
    jax_req = f"jax[tpu]=={ns.jax_version}" if ns.jax_version else "jax[tpu]"
    pkgs = " ".join(_dquote(p) for p in [jax_req, *ns.pip])
    install = (
        f"{fetch}(python3 -m pip install -q --user -U uv || "
        "python3 -m pip install -q --user --break-system-packages -U uv) && "
        f"python3 -m uv venv --allow-existing --python {shlex.quote(ns.python)} {venv} && "
        f"python3 -m uv pip install --python {venv}/bin/python -e {rdir} {pkgs} && "
        f"echo \"== $(hostname)\" && python3 -m uv pip list --python {venv}/bin/python | "
        "grep -E \"^(jax|jaxlib|libtpu) \""
    )
    return steps + [ssh_all(ns, install)]


def plan_run(ns: argparse.Namespace, overrides: Sequence[str]) -> list[common.Step]:
    """Kill leftovers, then start the same train command on every host (nohup, log per host)."""
    devices = None
    if ns.accelerator_type:
        tpu = common.parse_tpu_type(ns.accelerator_type)
        devices = tpu.devices
        if tpu.hosts > 1 and not ns.workdir.startswith("gs://"):
            print(f"warning: {common.describe_slice(tpu)} but --workdir {ns.workdir!r} is not on "
                  "GCS: each host would write its own copy; use gs://BUCKET/DIR", file=sys.stderr)
    where = common.describe_slice(tpu) if ns.accelerator_type else ""
    full = common.plan_overrides(ns, overrides, devices, where)
    if devices is None and common.mesh_from_overrides(full):
        print("warning: the mesh is not checked against the pod: pass --accelerator-type",
              file=sys.stderr)
    train = shlex.join(common.train_command(ns.config, ns.workdir, full, ns.entrypoint))
    log = 'logs/train-"$(hostname)".log'
    envs = "".join(f"export {shlex.quote(e)}; " for e in ns.env)
    prefix = (
        f"set -o pipefail; cd {remote_path(ns.remote_dir)} || exit 1; mkdir -p logs; "
        "p=$(cat logs/train.pid 2>/dev/null) && ps -ww -p \"$p\" -o args= | grep -q qtransformers "
        f"&& kill -9 \"$p\"; {KILL_TPU_HOLDERS}; "
        f". {remote_path(ns.venv)}/bin/activate || exit 1; {envs}"
    )
    if ns.foreground:
        start = f"{train} 2>&1 | tee {log}"
    else:
        start = (f"nohup {train} > {log} 2>&1 < /dev/null & echo $! > logs/train.pid; "
                 f"echo \"$(hostname): started pid $!, log $PWD/{log}\"")
    return [ssh_all(ns, prefix + start)]


def plan_stop(ns: argparse.Namespace) -> list[common.Step]:
    """SIGTERM the run (it checkpoints on preemption), wait, then free the TPU on every host."""
    cmd = (f"cd {remote_path(ns.remote_dir)} || exit 1; p=$(cat logs/train.pid 2>/dev/null) && "
           "kill \"$p\" 2>/dev/null && for _ in $(seq 60); do kill -0 \"$p\" 2>/dev/null || break; "
           f"sleep 2; done; {KILL_TPU_HOLDERS}; rm -f logs/train.pid")
    return [ssh_all(ns, cmd)]


def plan_tail(ns: argparse.Namespace) -> list[common.Step]:
    """Print the last lines of each host's log."""
    cmd = (f"cd {remote_path(ns.remote_dir)} && echo \"== $(hostname)\" && "
           f"tail -n {int(ns.lines)} logs/train-\"$(hostname)\".log")
    return [ssh_all(ns, cmd)]


def plan_delete(ns: argparse.Namespace) -> list[common.Step]:
    """`gcloud ... tpu-vm delete NAME --quiet`."""
    return [_gcloud(ns, "delete", ns.name) + ["--quiet"]]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with subcommands create / setup / run / stop / tail / delete."""
    shared = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    shared.add_argument("--name", required=True, help="TPU VM (pod) name")
    shared.add_argument("--zone", required=True, help="e.g. us-central2-b")
    shared.add_argument("--project", default=None, help="GCP project (default: gcloud config)")
    shared.add_argument("--dry-run", action="store_true",
                        help="print the commands, one per line, and run nothing")
    where = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    where.add_argument("--remote-dir", default="qtransformers",
                       help="project checkout on each host, under $HOME (default: %(default)s)")
    where.add_argument("--venv", default="qtransformers-venv",
                       help="virtualenv on each host, relative to $HOME (default: %(default)s)")

    parser = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", parents=[shared], allow_abbrev=False, help="create the TPU VM")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-64, v5p-128")
    p.add_argument("--runtime-version", default=None,
                   help=f"TPU software version (default per generation: {RUNTIME_VERSIONS})")
    p.add_argument("--spot", action="store_true", help="create a Spot TPU")
    p = sub.add_parser("setup", parents=[shared, where], allow_abbrev=False,
                       help="copy/clone the project and install it with jax[tpu] on all hosts")
    p.add_argument("--repo", required=True, help="git URL to clone, or a local path to copy")
    p.add_argument("--branch", default=None, help="git branch or tag to clone")
    p.add_argument("--python", default="3.11", help="Python version of the venv (uv fetches it)")
    p.add_argument("--jax-version", default=None,
                   help="pin jax[tpu]==VERSION (the same on every host; strongly recommended)")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement (repeatable)")
    p = sub.add_parser("run", parents=[shared, where], allow_abbrev=False,
                       help="start the train command on all hosts (overrides after --)")
    common.add_train_arguments(p)
    p.add_argument("--accelerator-type", default=None,
                   help="pod type, to check the mesh against its device count")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported on each host")
    p.add_argument("--foreground", action="store_true",
                   help="stream output and wait for the end instead of nohup (used by sweeps)")
    sub.add_parser("stop", parents=[shared, where], allow_abbrev=False,
                   help="stop the run (SIGTERM, then free the TPU) on all hosts")
    p = sub.add_parser("tail", parents=[shared, where], allow_abbrev=False,
                       help="last lines of every host's log")
    p.add_argument("--lines", type=int, default=50)
    sub.add_parser("delete", parents=[shared], allow_abbrev=False, help="delete the TPU VM")
    return parser


def plan(ns: argparse.Namespace, overrides: Sequence[str] = ()) -> list[common.Step]:
    """The steps for the parsed subcommand."""
    if overrides and ns.command != "run":
        raise ValueError(f"config overrides are only accepted by `run`, not `{ns.command}`")
    if ns.command == "run":
        return plan_run(ns, overrides)
    return {"create": plan_create, "setup": plan_setup, "stop": plan_stop,
            "tail": plan_tail, "delete": plan_delete}[ns.command](ns)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv, build the plan and print (--dry-run) or execute it; returns the exit status."""
    return common.launcher_main(build_parser, plan, argv)


if __name__ == "__main__":
    sys.exit(main())
