"""Sweep expander: one training run per point of a product of config overrides.

    python3 launch/sweep.py --config C --workdir DIR \\
        --sweep config.model.softmax=vanilla,clipped --sweep config.seed=0,1 \\
        [--set config.optim.lr=1e-4] [--launcher local|slurm|tpu|xpk] [--dry-run] [-- LAUNCHER_ARGS]

Runs are the cartesian product of the --sweep axes, the first axis varying slowest (the order
given). Each run gets its own workdir DIR/<axis>=<value>,... named from the last component of
each swept key (softmax=clipped,seed=1), so reruns resume their own checkpoints. The launcher
wraps each run: `local` runs them one after the other here; `slurm` submits one job each
(JOB_NAME-<i>); `xpk` one workload each (WORKLOAD-<i>); `tpu` runs them one after the other on
the pod (foreground). LAUNCHER_ARGS after `--` go to that launcher (e.g. --name/--zone for tpu,
--nodes for slurm, --cluster/--workload/--tpu-type/--docker-image for xpk).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import posixpath
import re
import sys
from types import ModuleType
from typing import Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common, slurm, tpu_pod, xpk  # noqa: E402

LAUNCHERS = ("local", "slurm", "tpu", "xpk")


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the sweep."""

    index: int
    name: str  # e.g. "softmax=clipped,seed=1"
    workdir: str
    overrides: tuple[str, ...]  # --config.KEY=VALUE for the swept keys


def split_values(text: str) -> list[str]:
    """Split 'a,b,(1,2)' on commas outside brackets and quotes: ['a', 'b', '(1,2)']."""
    values, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(cur)
            cur = ""
            continue
        cur += ch
    values.append(cur)
    return [v.strip() for v in values]


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'config.model.softmax=a,b' -> ('config.model.softmax', ['a', 'b'])."""
    key, sep, values = spec.removeprefix("--").partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise ValueError(f"bad --sweep {spec!r}: expected config.KEY=V1,V2,...")
    key = key if key.startswith("config.") else f"config.{key}"
    vals = split_values(values)
    if not vals or any(v == "" for v in vals):
        raise ValueError(f"bad --sweep {spec!r}: empty value")
    if len(set(vals)) != len(vals):
        raise ValueError(f"bad --sweep {spec!r}: repeated value")
    return key, vals


def short_names(keys: Sequence[str]) -> list[str]:
    """The shortest dotted suffixes that tell the keys apart: softmax, seed, model.dropout, ..."""
    parts = [k.removeprefix("config.").split(".") for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key is swept twice: {sorted(keys)}")
    n = 1
    while True:
        names = [".".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        n += 1


def _path_safe(value: str) -> str:
    return re.sub(r"[^\w.+-]", "_", value)


def expand(axes: Sequence[tuple[str, Sequence[str]]], workdir: str) -> list[Run]:
    """All runs of the product, first axis slowest, each with a unique workdir under `workdir`."""
    keys = [k for k, _ in axes]
    names = short_names(keys)
    runs = []
    for i, combo in enumerate(itertools.product(*(vals for _, vals in axes))):
        name = ",".join(f"{n}={_path_safe(v)}" for n, v in zip(names, combo, strict=True))
        overrides = tuple(f"--{k}={v}" for k, v in zip(keys, combo, strict=True))
        runs.append(Run(i, name, posixpath.join(workdir.rstrip("/"), name), overrides))
    seen = {}
    for r in runs:
        if r.name in seen:
            raise ValueError(f"runs {seen[r.name]} and {r.index} both map to workdir {r.workdir}")
        seen[r.name] = r.index
    return runs


def _launcher_plan(module: ModuleType, argv: list[str],
                   rename: Callable[[argparse.Namespace], None]) -> list[common.Step]:
    parser = module.build_parser()
    ns, overrides = common.parse_with_overrides(parser, argv)
    rename(ns)
    return module.plan(ns, overrides)


def run_steps(launcher: str, run: Run, ns: argparse.Namespace,
              launcher_args: Sequence[str]) -> list[common.Step]:
    """The launcher's plan for one run."""
    overrides = [*ns.set, *run.overrides]
    train = ["--config", ns.config, "--workdir", run.workdir, "--entrypoint", ns.entrypoint]
    if launcher == "local":
        if launcher_args:
            raise ValueError(f"--launcher local takes no launcher arguments: {launcher_args}")
        return [common.train_command(ns.config, run.workdir, overrides, ns.entrypoint)]
    if launcher == "slurm":
        def rename(a):
            a.job_name = f"{a.job_name}-{run.index}"
        return _launcher_plan(slurm, [*launcher_args, *train, "--", *overrides], rename)
    if launcher == "xpk":
        def rename(a):
            try:
                a.workload = xpk.workload_name(f"{a.workload}-{run.index}")
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        return _launcher_plan(xpk, ["create", *launcher_args, *train, "--", *overrides], rename)
    return _launcher_plan(tpu_pod, ["run", *launcher_args, *train, "--foreground", "--",
                                    *overrides], lambda a: None)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the sweep expander."""
    p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--config", required=True, help="config file and preset")
    p.add_argument("--workdir", required=True, help="parent of the per-run workdirs")
    p.add_argument("--sweep", action="append", default=[], metavar="config.KEY=V1,V2",
                   help="an axis of the product (repeatable; first varies slowest)")
    p.add_argument("--set", action="append", default=[], metavar="config.KEY=V",
                   help="a fixed override for every run (repeatable)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local")
    p.add_argument("--entrypoint", default=common.DEFAULT_ENTRYPOINT)
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Expand the sweep and print (--dry-run) or launch every run; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, launcher_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.sweep:
        parser.error("give at least one --sweep config.KEY=V1,V2")
    try:
        ns.set = [common.normalize_override(s) for s in ns.set]
        runs = expand([parse_axis(s) for s in ns.sweep], ns.workdir)
        steps: list[common.Step] = []
        for run in runs:
            steps.append(common.Comment(
                f"run {run.index + 1}/{len(runs)}: {run.name} -> {run.workdir}"))
            steps += run_steps(ns.launcher, run, ns, launcher_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return common.run_plan(steps, ns.dry_run)

if __name__ == "__main__":
    sys.exit(main())
