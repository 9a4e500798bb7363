"""SLURM launcher: render launch/slurm.sbatch for a multi-node GPU job and submit it.

    python3 launch/slurm.py --nodes 4 --gpus-per-node 8 [--partition P] [--time 24:00:00]
                            --config C --workdir /shared/runs/r1 [--mesh data=-1,fsdp=8]
                            [--env-setup 'source ~/venv/bin/activate'] [-- OVERRIDES]

The rendered script (written to LOG_DIR/JOB_NAME.sbatch) starts the train command once per node
with srun; jax.distributed.initialize() detects SLURM, the script fixes the coordinator port,
gives each process all GPUs of its node and sets XLA / NCCL environment. --dry-run prints the
mkdir, the script as a here-document and the sbatch command, and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")
ENV_SETUP_MARKER = "# QTX_ENV_SETUP"


def _set_directive(script: str, key: str, value: str | None) -> str:
    """Replace `#SBATCH --key=...` (or add it after --nodes); value None removes it."""
    line = f"#SBATCH --{key}={value}" if value is not None else ""
    pattern = re.compile(rf"^#SBATCH --{re.escape(key)}=.*\n", re.M)
    if pattern.search(script):
        return pattern.sub(lambda _: line + "\n" if line else "", script, count=1)
    if not line:
        return script
    return re.sub(r"^(#SBATCH --nodes=.*\n)", lambda m: f"{m.group(1)}{line}\n", script,
                  count=1, flags=re.M)


def _set_default(script: str, var: str, value: str) -> str:
    """Replace the default of `VAR="${VAR:-default}"` with `value`."""
    if re.search(r'["$`\\}]', value):
        raise ValueError(f"{var} value {value!r} may not contain quotes, $, `, \\ or }}")
    pattern = re.compile(rf'^{var}="\$\{{{var}:-[^}}]*\}}"$', re.M)
    if not pattern.search(script):
        raise ValueError(f"template {TEMPLATE} has no {var} default line")
    return pattern.sub(lambda _: f'{var}="${{{var}:-{value}}}"', script, count=1)


def render_script(ns: argparse.Namespace, template: str | None = None) -> str:
    """The sbatch script with the directives and defaults taken from the parsed flags."""
    if template is None:
        with open(TEMPLATE, encoding="utf-8") as f:
            template = f.read()
    s = template
    for key, value in [("job-name", ns.job_name), ("nodes", str(ns.nodes)),
                       ("gpus-per-node", str(ns.gpus_per_node)),
                       ("cpus-per-task", str(ns.cpus_per_task)), ("time", ns.time),
                       ("output", f"{ns.log_dir}/%x-%j.out"), ("partition", ns.partition),
                       ("account", ns.account), ("qos", ns.qos)]:
        if value is not None and "\n" in value:
            raise ValueError(f"--{key} may not contain a newline")
        s = _set_directive(s, key, value)
    s = _set_default(s, "QTX_COORDINATOR_PORT", str(ns.coordinator_port))
    s = _set_default(s, "QTX_INIT_TIMEOUT", str(ns.init_timeout))
    s = _set_default(s, "QTX_GPUS_PER_NODE", str(ns.gpus_per_node))
    s = _set_default(s, "QTX_ENTRYPOINT", ns.entrypoint)
    if ns.env_setup:
        if ENV_SETUP_MARKER not in s:
            raise ValueError(f"template {TEMPLATE} has no {ENV_SETUP_MARKER!r} line")
        s = s.replace(ENV_SETUP_MARKER, "\n".join(ns.env_setup), 1)
    return s


def plan(ns: argparse.Namespace, overrides: Sequence[str] = ()) -> list[common.Step]:
    """mkdir the log dir, write the rendered script there, `sbatch` it with the train arguments."""
    if ns.nodes < 1 or ns.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    if not re.fullmatch(r"[\w.-]+", ns.job_name):
        raise ValueError(f"--job-name {ns.job_name!r}: use letters, digits, '.', '_' and '-'")
    port = str(ns.coordinator_port)
    if port != "auto" and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--coordinator-port must be 1..65535 or 'auto', got {port!r}")
    devices = ns.nodes * ns.gpus_per_node
    full = common.plan_overrides(ns, overrides, devices,
                                 f"{ns.nodes} nodes x {ns.gpus_per_node} GPUs")
    ns.log_dir = os.path.abspath(ns.log_dir)
    script_path = os.path.join(ns.log_dir, f"{ns.job_name}.sbatch")
    sbatch = ["sbatch", "--parsable", *ns.sbatch_arg, script_path, ns.config, ns.workdir, *full]
    return [common.MakeDirs(ns.log_dir), common.WriteFile(script_path, render_script(ns)), sbatch]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the SLURM launcher."""
    p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=2, help="nodes (one process each; default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--cpus-per-task", type=int, default=16, help="CPU cores per node task")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM QOS")
    p.add_argument("--time", default="24:00:00", help="time limit (default %(default)s)")
    p.add_argument("--job-name", default="qtransformers", help="job name (default %(default)s)")
    p.add_argument("--log-dir", default="slurm-logs",
                   help="job logs and the rendered script (default %(default)s, created)")
    p.add_argument("--coordinator-port", default="8476",
                   help="port of process 0 on the first node, or 'auto' (JAX derives it from "
                        "the job id)")
    p.add_argument("--init-timeout", type=int, default=300,
                   help="seconds to wait for all hosts in jax.distributed.initialize()")
    p.add_argument("--env-setup", action="append", default=[],
                   help="shell line run before training, e.g. 'source ~/venv/bin/activate' "
                        "(repeatable)")
    p.add_argument("--sbatch-arg", action="append", default=[],
                   help="extra sbatch option, e.g. --sbatch-arg=--constraint=h100 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands and the rendered script; submit nothing")
    common.add_train_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv, render and print (--dry-run) or submit the job; returns the exit status."""
    return common.launcher_main(build_parser, plan, argv)


if __name__ == "__main__":
    sys.exit(main())
