"""launch/plan.py: the planner's memory / FLOPs / step-time numbers for the paper configs on pods;
the XPK base-image install adds the GCS packages a gs:// workdir needs."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `launch/` is not an installed package; import it from the checkout
    sys.path.insert(0, str(ROOT))

from launch import plan  # noqa: E402


def _run(capsys, *argv):
    status = plan.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _value(out, name):
    return next(line[26:] for line in out.splitlines() if line.startswith(name))


def test_bert_base_on_v4_32_and_h100(capsys):
    config = ROOT / "configs" / "bert_base.py"
    status, out, _ = _run(capsys, "--config", f"{config}:method=clipped",
                          "--accelerator-type", "v4-32")
    assert status == 0 and "16 chips on 4 hosts" in out and "mesh data=16, fsdp=1" in out
    assert _value(out, "FLOPs / step") == "2.179e+13"
    assert _value(out, "batch per device x seq") == "16 x 128"
    assert _value(out, "step time at 50% MFU").startswith("9.9 ms (peak 275 TFLOP/s")
    assert _value(out, "train.num_steps").startswith("1,000,000 steps: 2.8 h")
    status, out, _ = _run(capsys, "--config", config, "--gpus", 16, "--gpu", "h100",
                          "--", "--config.train.compute_dtype=float32")
    assert status == 0 and _value(out, "total / device") == "4.323 GiB"
    assert _value(out, "step time at 50% MFU").startswith("2.8 ms")


def test_opt_sizes_on_v5e_and_what_does_not_fit(capsys):
    config = ROOT / "configs" / "opt_125m.py"
    status, out, _ = _run(capsys, "--config", config, "--accelerator-type", "v5litepod-64",
                          "--mfu", 0.4)
    assert status == 0 and _value(out, "batch per device x seq") == "3 x 512"
    assert _value(out, "FLOPs / step") == "7.848e+13"
    assert _value(out, "step time at 40% MFU").startswith("15.6 ms")
    big = ROOT / "configs" / "opt_1_3b.py"  # remat + FSDP over all devices: fits
    status, out, _ = _run(capsys, "--config", big, "--accelerator-type", "v5litepod-64")
    assert status == 0 and "mesh data=1, fsdp=64" in out
    status, out, _ = _run(capsys, "--config", big, "--accelerator-type", "v5litepod-64",
                          "--mesh", "data=-1,fsdp=1,tensor=1")  # replicated AdamW state
    assert status == 1 and "DOES NOT FIT" in out and "shard more" in out


def test_reproduce_preset_plans_one_run_and_counts_the_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no wikitext-103 here: planning does not need the gpu data
    config = ROOT / "configs" / "reproduce.py"
    status, out, _ = _run(capsys, "--config", f"{config}:gpu", "--gpus", 1, "--mfu", 0.1)
    assert status == 0 and _value(out, "batch per device x seq") == "512 x 64"
    step_ms = float(_value(out, "step time at 10% MFU").split()[0])
    assert _value(out, "train.num_steps") == f"40,000 steps: {40_000 * step_ms / 60e3:.0f} min"
    assert _value(out, "reproduce").startswith("6 runs like this one (methods x seeds): "
                                               f"{6 * 40_000 * step_ms / 3.6e6:.1f} h")
    status, out, _ = _run(capsys, "--config", f"{config}:gpu,methods=sweep", "--gpus", 1)
    assert status == 0 and _value(out, "reproduce").startswith("12 runs")


def test_bad_mesh_or_batch_is_an_error(capsys):
    config = ROOT / "configs" / "opt_125m.py"
    status, _, err = _run(capsys, "--config", config, "--accelerator-type", "v4-32",
                          "--mesh", "data=3,fsdp=-1")
    assert status == 2 and "does not fit 16 devices" in err
    status, _, err = _run(capsys, "--config", config, "--gpus", 16, "--",
                          "--config.train.global_batch_size=100")
    assert status == 2 and "not divisible" in err


def test_xpk_base_image_installs_gcs_packages_for_a_gs_workdir(capsys):
    import shlex

    from launch import xpk
    base = ["create", "--cluster", "c", "--workload", "w", "--tpu-type", "v5litepod-16",
            "--base-docker-image", "python:3.11", "--config", "c.py", "--dry-run"]
    for workdir, wanted in (("gs://b/run", True), ("/mnt/shared/run", False)):
        assert xpk.main([*base, "--workdir", workdir]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        command = shlex.split(line)[-1].removeprefix("--command=")
        assert command.startswith("python3 -m pip install -q -e . 'jax[tpu]'")
        assert ("gcsfs google-cloud-storage &&" in command) == wanted
