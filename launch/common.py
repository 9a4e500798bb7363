"""Shared launcher helpers: tool lookup, command rendering / execution, TPU pod sizes, mesh checks.

A launcher builds a *plan*: a list of steps, each a command (a list of argv strings) or a
`WriteFile`. `--dry-run` prints the plan as shell lines (`shlex.join`, files as quoted
here-documents), so the printed text is itself a runnable script; otherwise the tools the plan
needs are looked up first and a missing one is reported with what to install (exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Iterable, Sequence, TextIO, Union

INSTALL_HINTS: dict[str, str] = {
    "gcloud": ("install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), "
               "then run `gcloud auth login` and `gcloud config set project PROJECT`"),
    "xpk": ("install XPK with `pip install xpk` (https://github.com/AI-Hypercomputer/xpk); "
            "it also needs the Google Cloud CLI and kubectl"),
    "kubectl": ("install kubectl with `gcloud components install kubectl "
                "gke-gcloud-auth-plugin` (or your OS package manager)"),
    "sbatch": ("`sbatch` comes with the SLURM client tools: run this on the cluster's login "
               "node (or install slurm-client and point it at your slurmctld)"),
    "qtransformers": ("install this project with `pip install -e .` "
                      "(it provides the console script)"),
}

MESH_OVERRIDE_PREFIX = "--config.mesh.shape."
DEFAULT_ENTRYPOINT = "qtransformers train"


class MissingToolError(RuntimeError):
    """A command-line tool the plan needs is not on PATH."""


@dataclasses.dataclass(frozen=True)
class WriteFile:
    """A plan step that writes `content` to `path` (rendered as a quoted here-document)."""

    path: str
    content: str


@dataclasses.dataclass(frozen=True)
class MakeDirs:
    """A plan step that creates a directory and its parents (rendered as `mkdir -p`)."""

    path: str


@dataclasses.dataclass(frozen=True)
class Comment:
    """A plan step that only explains (rendered as `# text`, echoed to stderr when executing)."""

    text: str


Step = Union[Sequence[str], WriteFile, MakeDirs, Comment]
_NOT_COMMANDS = (WriteFile, MakeDirs, Comment)
_HEREDOC_END = "QTX_EOF"


def require_tools(names: Iterable[str]) -> None:
    """Raise MissingToolError naming every tool in `names` missing from PATH, with install hints."""
    missing = [n for n in dict.fromkeys(names) if shutil.which(n) is None]
    if missing:
        lines = [f"`{n}` was not found on PATH: {INSTALL_HINTS.get(n, 'install it')}."
                 for n in missing]
        raise MissingToolError("\n".join(lines))


def render(step: Step) -> str:
    """One plan step as shell text: a shlex-joined command line, or a here-document."""
    if isinstance(step, MakeDirs):
        return shlex.join(["mkdir", "-p", step.path])
    if isinstance(step, Comment):
        return "\n".join(f"# {line}" for line in step.text.splitlines())
    if isinstance(step, WriteFile):
        if f"\n{_HEREDOC_END}\n" in f"\n{step.content}\n":
            raise ValueError(f"file content contains the here-document marker {_HEREDOC_END}")
        body = step.content if step.content.endswith("\n") else step.content + "\n"
        return f"cat > {shlex.quote(step.path)} <<'{_HEREDOC_END}'\n{body}{_HEREDOC_END}"
    return shlex.join(list(step))


def launcher_main(build_parser: Callable[[], argparse.ArgumentParser],
                  plan: Callable[[argparse.Namespace, Sequence[str]], list[Step]],
                  argv: Sequence[str] | None, tools: Sequence[str] = ()) -> int:
    """The shared `main` of a launcher: parse argv (flags, then config overrides), build the
    plan, check `tools` are on PATH unless --dry-run, then print or execute the plan.

    Returns the exit status: 2 (with the reason on stderr) for a bad plan or a missing tool.
    """
    parser = build_parser()
    ns, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    try:
        steps = plan(ns, overrides)
        if tools and not ns.dry_run:
            require_tools(tools)  # say so before a tool fails half-way
    except (ValueError, MissingToolError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_plan(steps, ns.dry_run)


def run_plan(steps: Sequence[Step], dry_run: bool, out: TextIO | None = None) -> int:
    """Print (dry run) or execute the steps in order; returns the exit status.

    Executing checks every needed tool first (exit status 2 with install hints when one is
    missing), echoes each command to stderr as `+ cmd`, and stops at the first failure.
    """
    out = out or sys.stdout
    if dry_run:
        for step in steps:
            print(render(step), file=out)
        return 0
    try:
        require_tools(s[0] for s in steps if not isinstance(s, _NOT_COMMANDS))
    except MissingToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for step in steps:
        if isinstance(step, Comment):
            print(render(step), file=sys.stderr)
            continue
        if isinstance(step, MakeDirs):
            print(f"+ {render(step)}", file=sys.stderr)
            os.makedirs(step.path, exist_ok=True)
            continue
        if isinstance(step, WriteFile):
            print(f"+ write {step.path}", file=sys.stderr)
            with open(step.path, "w", encoding="utf-8") as f:
                f.write(step.content)
            continue
        print(f"+ {shlex.join(list(step))}", file=sys.stderr)
        rc = subprocess.run(list(step), check=False).returncode
        if rc != 0:
            print(f"error: command failed with exit status {rc}: {shlex.join(list(step))}",
                  file=sys.stderr)
            return rc
    return 0


# --------------------------------------------------------------------------- TPU pod sizes
# Accelerator-type names and what their number counts:
#   v2-N, v3-N  : N TensorCores, 2 per chip, 4 chips (8 cores) per host; JAX sees each core
#                 as a device, so devices = N.
#   v4-N, v5p-N : N TensorCores, 2 per chip (one megacore device per chip), 4 chips per host;
#                 chips = devices = N / 2, hosts = chips / 4 (v4-8 / v5p-8 is one host).
#   v5litepod-N (v5e), v6e-N : N chips. 1, 4 and 8 are single-host slices (all N chips on one
#                 host); larger slices (16, 32, ... 256) have 4 chips per host: hosts = N / 4.
_CORE_NAMED = {"v2", "v3", "v4", "v5p"}
_CHIP_NAMED = {"v5litepod", "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """The size of one TPU slice named by its accelerator type."""

    accelerator_type: str
    generation: str
    chips: int
    hosts: int
    chips_per_host: int
    devices: int  # jax.device_count() across the slice


def parse_tpu_type(accelerator_type: str) -> TpuSlice:
    """Chips, hosts and JAX devices of an accelerator type such as v4-32 or v5litepod-64."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type.strip().lower())
    gen, n = (m.group(1), int(m.group(2))) if m else ("", 0)
    if gen == "v5e":
        raise ValueError(f"unknown TPU type {accelerator_type!r}: v5e slices are named "
                         f"v5litepod-N (e.g. v5litepod-{n or 16})")
    if not m or gen not in _CORE_NAMED | _CHIP_NAMED:
        raise ValueError(f"unknown TPU type {accelerator_type!r}: expected v2-N, v3-N, v4-N, "
                         "v5p-N (N counts TensorCores), v5litepod-N or v6e-N (N counts chips)")
    if gen in _CORE_NAMED:
        if n < 8 or n % 8:
            raise ValueError(f"bad TPU type {accelerator_type!r}: {gen} names count TensorCores "
                             "(2 per chip, 4 chips per host), so N must be a multiple of 8")
        chips = n // 2
        hosts = chips // 4
        devices = n if gen in ("v2", "v3") else chips
        return TpuSlice(accelerator_type, gen, chips, hosts, 4, devices)
    if n in (1, 4, 8):
        return TpuSlice(accelerator_type, gen, n, 1, n, n)
    if n < 16 or n & (n - 1):
        raise ValueError(f"bad TPU type {accelerator_type!r}: {gen} names count chips; valid "
                         "sizes are 1, 4, 8 (one host) or a power of two >= 16 (4 chips per host)")
    return TpuSlice(accelerator_type, gen, n, n // 4, 4, n)


def describe_slice(s: TpuSlice, num_slices: int = 1) -> str:
    """A short human description, e.g. 'v4-32: 16 chips on 4 hosts (16 JAX devices)'."""
    per = f"{s.accelerator_type}: {s.chips} chips on {s.hosts} host{'s' * (s.hosts > 1)}"
    if num_slices > 1:
        per = f"{num_slices} x {per}"
    return f"{per} ({s.devices * num_slices} JAX devices)"


# --------------------------------------------------------------------------- mesh checks
def parse_mesh(spec: str) -> dict[str, int]:
    """Parse 'data=2,fsdp=4,tensor=1' into {'data': 2, 'fsdp': 4, 'tensor': 1} (-1 = fill)."""
    mesh: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name.strip()):
            raise ValueError(f"bad mesh axis {part!r}: expected NAME=SIZE, e.g. data=2,fsdp=4")
        try:
            mesh[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh axis size {part!r}: SIZE must be an integer") from None
    return mesh


def mesh_from_overrides(overrides: Sequence[str]) -> dict[str, int]:
    """The mesh axes set by `--config.mesh.<axis>=<int>` overrides (later ones win)."""
    mesh: dict[str, int] = {}
    for o in overrides:
        m = re.fullmatch(re.escape(MESH_OVERRIDE_PREFIX) + r"(\w+)=(-?\d+)", o)
        if m:
            mesh[m.group(1)] = int(m.group(2))
    return mesh


def mesh_overrides(mesh: dict[str, int]) -> list[str]:
    """The `--config.mesh.<axis>=<size>` overrides that set `mesh`."""
    return [f"{MESH_OVERRIDE_PREFIX}{k}={v}" for k, v in mesh.items()]


def check_mesh_fits(mesh_shape: dict[str, int], num_devices: int,
                    where: str = "") -> dict[str, int]:
    """Check that the mesh axes multiply to `num_devices`; returns the shape with -1 filled in.

    One axis may be -1 (filled with whatever the others leave). Raises ValueError naming the
    axes, their product and the device count when they do not match (the rule lives in
    `qtransformers.hardware.fill_mesh_axes`, a pure-Python module: no JAX needed here).
    """
    from qtransformers.hardware import fill_mesh_axes
    return fill_mesh_axes(mesh_shape, num_devices, "mesh", where)


# --------------------------------------------------------------------------- train command
def normalize_override(item: str) -> str:
    """'config.a.b=v' or 'a.b=v' -> '--config.a.b=v'; '--...' flags pass through unchanged."""
    if item.startswith("--"):
        return item
    if item.startswith("config.") and "=" in item:
        return f"--{item}"
    if "=" in item and not item.startswith("-"):
        return f"--config.{item}"
    raise ValueError(f"bad override {item!r}: expected --config.KEY=VALUE (or config.KEY=VALUE)")


def train_command(config: str, workdir: str, overrides: Sequence[str] = (),
                  entrypoint: str = DEFAULT_ENTRYPOINT) -> list[str]:
    """The argv every host runs: `qtransformers train --config C --workdir W [overrides]`."""
    return [*shlex.split(entrypoint), "--config", config, "--workdir", workdir,
            *(normalize_override(o) for o in overrides)]


def add_train_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add --config, --workdir, --entrypoint and --mesh (overrides go after `--`)."""
    parser.add_argument("--config", required=required,
                        help="config file and preset, e.g. configs/opt_125m.py:method=gated")
    parser.add_argument("--workdir", required=required,
                        help="checkpoints and logs (gs://bucket/dir on multi-host TPU pods)")
    parser.add_argument("--entrypoint", default=DEFAULT_ENTRYPOINT,
                        help=f"train command before its flags (default: {DEFAULT_ENTRYPOINT!r})")
    parser.add_argument("--mesh", type=parse_mesh, default=None,
                        help="mesh axes, e.g. data=-1,fsdp=4,tensor=1: checked against the device "
                             f"count and forwarded as {MESH_OVERRIDE_PREFIX}AXIS=SIZE overrides")


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse argv; everything after `--`, plus any `--config.KEY=VALUE`, becomes an override."""
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ns, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if not (u.startswith("--config.") and "=" in u)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (config overrides go after `--` "
                     "as --config.KEY=VALUE)")
    try:
        overrides = [normalize_override(o) for o in [*unknown, *rest]]
    except ValueError as e:
        parser.error(str(e))
    return ns, overrides


def plan_overrides(ns: argparse.Namespace, overrides: Sequence[str],
                   num_devices: int | None, where: str = "") -> list[str]:
    """Overrides with --mesh expanded; checks the resulting mesh against `num_devices` if known."""
    full = [*overrides, *(mesh_overrides(ns.mesh) if getattr(ns, "mesh", None) else [])]
    mesh = mesh_from_overrides(full)
    if mesh and num_devices is not None:
        check_mesh_fits(mesh, num_devices, where)
    return full
