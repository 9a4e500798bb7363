"""Will it fit, and how fast: per-device memory and step FLOPs of a config on a TPU slice or a GPU
cluster (qtransformers.planner, analytic, nothing is compiled), before launching.

    python3 launch/plan.py --config configs/opt_125m.py:gated --accelerator-type v4-32
    python3 launch/plan.py --config configs/reproduce.py:gpu --gpus 1 --gpu h100 --mfu 0.4
    python3 launch/plan.py --config configs/bert_base.py --gpus 16 --gpu h100 --mfu 0.4 \\
        --mesh data=-1,fsdp=2 -- --config.train.global_batch_size=512

Takes the same --config / --mesh / overrides-after-`--` as the launchers. Prints the plan, the
device's memory, and the step time, tokens/s and run length at the assumed model-FLOPs
utilisation (--mfu, default 0.5, of the dense bf16 peak). Exit status 1 when the plan does not
fit in 90% of a device's memory, 2 on a bad argument or config.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402

# accelerator generation -> (device_kind for hardware.peak_flops_per_device,
#                            hardware.DEVICE_MEMORY_BYTES key)
TPU_KINDS = {"v4": ("TPU v4", "v4"), "v5litepod": ("TPU v5 lite", "v5litepod"),
             "v5p": ("TPU v5p", "v5p"), "v6e": ("TPU v6 lite", "v6e")}
GPU_KINDS = {"h100": ("H100", "h100"), "h200": ("H200", "h200"), "a100": ("A100", "a100")}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Where the plan runs: a description, the device count, peak FLOP/s and memory per device
    (None when the planner does not know them)."""

    description: str
    num_devices: int
    peak_flops: float | None
    memory_bytes: float | None


def hardware(ns: argparse.Namespace) -> Hardware:
    """The Hardware of --accelerator-type [--num-slices] or --gpus --gpu."""
    from qtransformers.hardware import DEVICE_MEMORY_BYTES, peak_flops_per_device
    if ns.accelerator_type:
        tpu = common.parse_tpu_type(ns.accelerator_type)
        peak_key, memory_key = TPU_KINDS.get(tpu.generation, (None, None))
        return Hardware(common.describe_slice(tpu, ns.num_slices), tpu.devices * ns.num_slices,
                        peak_key and peak_flops_per_device(peak_key),
                        DEVICE_MEMORY_BYTES.get(memory_key))
    peak_key, memory_key = GPU_KINDS[ns.gpu]
    return Hardware(f"{ns.gpus} x {ns.gpu.upper()}", ns.gpus, peak_flops_per_device(peak_key),
                    DEVICE_MEMORY_BYTES[memory_key])


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of launch/plan.py (config overrides go after `--`)."""
    p = argparse.ArgumentParser(prog="launch/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="config file and preset, e.g. configs/opt_125m.py:method=gated")
    p.add_argument("--mesh", type=common.parse_mesh, default=None,
                   help="mesh axes, e.g. data=-1,fsdp=4,tensor=1 (default: the config's)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--accelerator-type", help="TPU slice, e.g. v4-32, v5litepod-64")
    where.add_argument("--gpus", type=int, help="GPUs in all nodes together, e.g. 16")
    p.add_argument("--gpu", choices=sorted(GPU_KINDS), default="h100", help="GPU kind")
    p.add_argument("--num-slices", type=int, default=1, help="TPU multislice count")
    p.add_argument("--mfu", type=float, default=0.5,
                   help="assumed model-FLOPs utilisation of the bf16 peak (default 0.5)")
    return p


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours < 1:
        return f"{seconds / 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _one_run(config):
    """(trainer config, run count): a `qtransformers reproduce` config is planned as its first
    method's seed-0 run (the methods differ by a few gate parameters at most)."""
    if "reproduce" not in config:
        return config, 1
    from qtransformers.reproduce.runner import method_config, ordered_methods
    methods = ordered_methods(config.reproduce.methods)
    num_runs = len(methods) * len(config.reproduce.train_seeds)
    return method_config(config, methods[0], 0), num_runs


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the plan; returns 0 (fits), 1 (does not fit) or 2 (bad arguments / config)."""
    parser = build_parser()
    ns, overrides = common.parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    from absl import flags
    from qtransformers.planner import check_fits, plan_training
    from qtransformers.train.config import validate_config
    from qtransformers.train.main import parse_args
    try:
        hw = hardware(ns)
        overrides = common.plan_overrides(ns, overrides, hw.num_devices, hw.description)
        config, _ = parse_args(["plan", "--config", ns.config, "--workdir", "unused", *overrides])
        config, num_runs = _one_run(config)
        model_cfg = validate_config(config, check_paths=False)  # data may live elsewhere
        mesh = {k: int(v) for k, v in config.mesh.shape.items()}
        plan = plan_training(model_cfg, global_batch_size=config.train.global_batch_size,
                             num_devices=hw.num_devices, mesh_shape=mesh,
                             seq_len=config.data.seq_len,
                             grad_accum_steps=config.optim.grad_accum_steps)
    except (ValueError, flags.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolved = common.check_mesh_fits(mesh, hw.num_devices)
    print(f"{ns.config} on {hw.description}")
    print(f"mesh {', '.join(f'{k}={v}' for k, v in resolved.items())}; compute "
          f"{model_cfg.dtype}, float32 params and AdamW state; remat {model_cfg.remat}; "
          f"grad_accum_steps {config.optim.grad_accum_steps}")
    print(plan.table())
    status = 0
    if hw.memory_bytes:
        try:
            check_fits(plan, hw.memory_bytes)
            print(f"{'device memory':<26}{hw.memory_bytes / 1e9:.0f} GB: fits (90% usable)")
        except ValueError as err:
            print(f"{'device memory':<26}{hw.memory_bytes / 1e9:.0f} GB: DOES NOT FIT: {err}")
            status = 1
    if hw.peak_flops:
        step = plan.step_seconds(hw.peak_flops, ns.mfu)
        items = config.train.global_batch_size * (plan.seq_len if model_cfg.family != "vit"
                                                  else 1)
        unit = "images" if model_cfg.family == "vit" else "tokens"
        print(f"{f'step time at {ns.mfu:.0%} MFU':<26}{step * 1e3:.1f} ms "
              f"(peak {hw.peak_flops / 1e12:.0f} TFLOP/s bf16 per device)")
        print(f"{unit + ' / s':<26}{items / step:,.0f}")
        print(f"{'train.num_steps':<26}{config.train.num_steps:,} steps: "
              f"{_duration(step * config.train.num_steps)}")
        if num_runs > 1:
            print(f"{'reproduce':<26}{num_runs} runs like this one (methods x seeds): "
                  f"{_duration(num_runs * step * config.train.num_steps)}")
    else:
        print("step time: unknown peak FLOP/s for this device (see planner.DEVICE_PEAK_FLOPS)")
    return status


if __name__ == "__main__":
    sys.exit(main())
