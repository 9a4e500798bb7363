"""XPK launcher: run the train command as a JobSet workload on a GKE TPU cluster.

    python3 launch/xpk.py create --cluster C --workload W --tpu-type v5litepod-64 [--num-slices N]
                                 (--docker-image IMG | --base-docker-image python:3.11)
                                 --config C --workdir gs://B/D [--mesh data=-1,fsdp=16] [-- OVR]
    python3 launch/xpk.py delete --cluster C --workload W
    python3 launch/xpk.py list   --cluster C

XPK starts one container per TPU host on every slice (so every host runs the same command, as
jax.distributed.initialize() needs) and sets the multislice environment. With --docker-image the
image must already contain this project (`pip install -e .` plus jax[tpu]); with
--base-docker-image, XPK copies --script-dir (default: this checkout) into /app of that image
and the command installs the project first (plus gcsfs and google-cloud-storage for a gs://
workdir; a prebuilt image needs them too). Add --dry-run to print the xpk command only.
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

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def workload_name(value: str) -> str:
    """Validate an XPK workload name: lowercase letters, digits and '-', at most 40 characters."""
    if not WORKLOAD_NAME.fullmatch(value) or len(value) > 40:
        raise argparse.ArgumentTypeError(
            f"bad workload name {value!r}: use at most 40 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-'")
    return value


def _xpk(ns: argparse.Namespace, *args: str) -> list[str]:
    cmd = ["xpk", "workload", *args, f"--cluster={ns.cluster}"]
    if ns.project:
        cmd.append(f"--project={ns.project}")
    if ns.zone:
        cmd.append(f"--zone={ns.zone}")
    return cmd


def container_command(ns: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The shell command every container runs (installing the project first on a base image)."""
    train = shlex.join(common.train_command(ns.config, ns.workdir, overrides, ns.entrypoint))
    if ns.docker_image:
        return train
    jax_req = f"jax[tpu]=={ns.jax_version}" if ns.jax_version else "jax[tpu]"
    # gs:// workdirs: epath needs gcsfs and orbax google-cloud-storage (pyproject's [gcs] extra).
    gcs = " gcsfs google-cloud-storage" if ns.workdir.startswith("gs://") else ""
    return f"python3 -m pip install -q -e . {shlex.quote(jax_req)}{gcs} && {train}"


def plan_create(ns: argparse.Namespace, overrides: Sequence[str]) -> list[common.Step]:
    """`xpk workload create ...` after checking the mesh against slices x chips per slice."""
    tpu = common.parse_tpu_type(ns.tpu_type)
    if ns.num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {ns.num_slices}")
    if not ns.workdir.startswith("gs://"):
        print(f"warning: --workdir {ns.workdir!r} is not on GCS; containers are ephemeral, so "
              "checkpoints and logs would be lost: use gs://BUCKET/DIR", file=sys.stderr)
    full = common.plan_overrides(ns, overrides, tpu.devices * ns.num_slices,
                                 common.describe_slice(tpu, ns.num_slices))
    cmd = _xpk(ns, "create", f"--workload={ns.workload}", f"--tpu-type={ns.tpu_type}",
               f"--num-slices={ns.num_slices}")
    if ns.docker_image:
        cmd.append(f"--docker-image={ns.docker_image}")
    else:
        cmd += [f"--base-docker-image={ns.base_docker_image}",
                f"--script-dir={os.path.abspath(ns.script_dir)}"]
    if ns.priority:
        cmd.append(f"--priority={ns.priority}")
    if ns.max_restarts:
        cmd.append(f"--max-restarts={ns.max_restarts}")
    cmd += [f"--env={e}" for e in ns.env]
    return [cmd + [f"--command={container_command(ns, full)}"]]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with subcommands create / delete / list."""
    shared = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    shared.add_argument("--cluster", required=True, help="GKE cluster created by xpk")
    shared.add_argument("--project", default=None, help="GCP project (default: gcloud config)")
    shared.add_argument("--zone", default=None, help="cluster zone (default: gcloud config)")
    shared.add_argument("--dry-run", action="store_true",
                        help="print the xpk command and run nothing")
    parser = argparse.ArgumentParser(prog="launch/xpk.py", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", parents=[shared], allow_abbrev=False,
                       help="submit the training workload (overrides after --)")
    p.add_argument("--workload", required=True, type=workload_name)
    p.add_argument("--tpu-type", required=True, help="e.g. v5litepod-64, v5p-128, v4-32")
    p.add_argument("--num-slices", type=int, default=1, help="multislice count (default 1)")
    image = p.add_mutually_exclusive_group(required=True)
    image.add_argument("--docker-image", help="prebuilt image containing the project")
    image.add_argument("--base-docker-image",
                       help="base image (Python >= 3.11) that XPK adds --script-dir to")
    p.add_argument("--script-dir", default=PROJECT_ROOT,
                   help="with --base-docker-image: folder copied to /app (default: this checkout)")
    p.add_argument("--jax-version", default=None, help="with --base-docker-image: pin jax[tpu]")
    p.add_argument("--priority", default=None,
                   choices=["very-low", "low", "medium", "high", "very-high"])
    p.add_argument("--max-restarts", type=int, default=0,
                   help="JobSet restarts on failure (resume from the latest checkpoint)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the containers")
    common.add_train_arguments(p)
    p = sub.add_parser("delete", parents=[shared], allow_abbrev=False, help="delete a workload")
    p.add_argument("--workload", required=True, type=workload_name)
    p.add_argument("--force", action="store_true", help="delete without asking")
    sub.add_parser("list", parents=[shared], allow_abbrev=False, help="list workloads")
    return parser


def plan(ns: argparse.Namespace, overrides: Sequence[str] = ()) -> list[common.Step]:
    """The steps for the parsed subcommand."""
    if overrides and ns.command != "create":
        raise ValueError(f"config overrides are only accepted by `create`, not `{ns.command}`")
    if ns.command == "create":
        return plan_create(ns, overrides)
    if ns.command == "delete":
        return [_xpk(ns, "delete", f"--workload={ns.workload}") + ["--force"] * ns.force]
    return [_xpk(ns, "list")]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse argv, build the plan and print (--dry-run) or execute it; returns the exit status.
    xpk shells out to gcloud and kubectl too: all three must be on PATH."""
    return common.launcher_main(build_parser, plan, argv, tools=("xpk", "gcloud", "kubectl"))


if __name__ == "__main__":
    sys.exit(main())
