"""Every bad input a user can give the four commands is one line on stderr naming the field or
path, exit status 2, no traceback, and leaves a trained workdir byte-identical; --help of each
command exits 0 and lists its flags.

All cases run in-process through `qtransformers.cli.main(argv)` against one tiny workdir trained
once for the module (a subprocess importing JAX costs seconds; two subprocess cases check that
the real console output is one line too).
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from flax import serialization

from qtransformers import cli
from qtransformers.train.workdir_lock import LOCK_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_opt.py")
REPRODUCE_CONFIG = os.path.join(ROOT, "configs", "reproduce.py")
# 1 block, 4 steps, a checkpoint at steps 2 and 4, metrics every step.
TRAIN_OVERRIDES = ["--config.model.num_layers=1", "--config.data.seq_len=32",
                   "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
                   "--config.train.log_every=1", "--config.train.eval_every=0",
                   "--config.train.outlier_eval_every=0", "--config.train.async_checkpoint=False"]



def corrupt_checkpoints(workdir: str, step: str) -> None:
    """Overwrites every state file of checkpoint `step` ('*' = all steps) with garbage."""
    for path in glob.glob(os.path.join(workdir, "checkpoints", step, "state", "**", "*"),
                          recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\0garbage\0" * 8)

def train_argv(workdir, *extra, config=f"{CONFIG}:vanilla"):
    return ["train", f"--config={config}", f"--workdir={workdir}", *TRAIN_OVERRIDES, *extra]


def snapshot(workdir):
    """{relative path: sha256} of every file of the workdir except the lock, plus its entries."""
    out = {"entries": tuple(sorted(set(os.listdir(workdir)) - {LOCK_FILE}))}
    for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
        if os.path.isfile(path) and not path.endswith(LOCK_FILE):
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained workdir and the bad files the cases point at."""
    base = tmp_path_factory.mktemp("cli_errors")
    workdir = str(base / "run")
    assert cli.main(train_argv(workdir)) == 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    files = {}
    for name, content in {"empty.txt": b"", "blank.txt": b"\n   \n\t\n",
                          "binary.txt": bytes(range(256)) * 20,
                          "one_line.txt": b"just one line of text\n",
                          "good.txt": b"first line of text\nsecond line of text\n" * 20,
                          "params.msgpack": b"this is not msgpack"}.items():
        (base / name).write_bytes(content)
        files[name] = str(base / name)
    (base / "plain_dir").mkdir()
    files["plain_dir"] = str(base / "plain_dir")
    hf = base / "bad_hf"  # a HuggingFace folder without weights
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 64}))
    files["bad_hf"] = str(hf)
    other = base / "other_json"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"something": "else"}))
    files["other_json"] = str(other)
    # every checkpoint corrupt
    corrupt = str(base / "corrupt")
    shutil.copytree(workdir, corrupt)
    corrupt_checkpoints(corrupt, "*")
    files["corrupt"] = corrupt
    # params of the 1-layer model, for a 2-layer --model
    from qtransformers.evaluate.checkpoints import restore_trainer_workdir
    _, params, _ = restore_trainer_workdir(workdir)
    (base / "one_layer.msgpack").write_bytes(serialization.to_bytes(params))
    files["one_layer.msgpack"] = str(base / "one_layer.msgpack")
    files["a_file"] = files["good.txt"]
    return workdir, files, str(base)


def _text(name):
    return ["--config.data.source=text", f"--config.data.path={{{name}}}"]


# (id, argv template, text the one line must contain). {W} = the trained workdir, {name} = a
# file of the fixture, {base} = its folder.
CASES = [
    # train: config file, preset, key, type, value
    ("train-missing-config-file", ["train", "--config=/nope/x.py", "--workdir={W}"], "/nope/x.py"),
    ("train-config-not-py", ["train", "--config={good.txt}", "--workdir={W}"], "good.txt"),
    ("train-bad-preset", train_argv("{W}", config=f"{CONFIG}:bogus"), "model.method"),
    ("train-bad-preset-key", train_argv("{W}", config=f"{CONFIG}:size=3"), "'size'"),
    ("train-bad-type", train_argv("{W}", "--config.train.num_steps=abc"), "train.num_steps"),
    ("train-unknown-key", train_argv("{W}", "--config.train.nsteps=3"), "train.nsteps"),
    ("train-bad-value", train_argv("{W}", "--config.train.num_steps=-1"), "train.num_steps"),
    ("train-bad-lr", train_argv("{W}", "--config.optim.lr=-1.0"), "optim.lr"),
    ("train-unknown-flag", train_argv("{W}", "--bogus_flag=1"), "bogus_flag"),
    ("train-positional", train_argv("{W}", "stray"), "stray"),
    ("train-no-workdir", ["train", f"--config={CONFIG}"], "--workdir"),
    ("train-no-config", ["train", "--workdir={W}"], "--config"),
    # train: data paths
    ("train-missing-data", train_argv("{W}", "--config.data.source=text",
                                      "--config.data.path=/nope/corpus.txt"), "/nope/corpus.txt"),
    ("train-empty-data", train_argv("{W}", *_text("empty.txt")), "empty.txt"),
    ("train-blank-data", train_argv("{W}", *_text("blank.txt")), "blank.txt"),
    ("train-binary-data", train_argv("{W}", *_text("binary.txt")), "binary.txt"),
    ("train-empty-eval-split", train_argv("{W}", *_text("one_line.txt")), "one_line.txt"),
    ("train-empty-eval-file", train_argv("{W}", *_text("good.txt"),
                                         "--config.data.eval_path={empty.txt}"), "eval_path"),
    ("train-missing-tokenizer", train_argv("{W}", "--config.data.tokenizer=/nope/t.json"),
     "data.tokenizer"),
    # train: workdir and run identity
    ("train-workdir-is-file", train_argv("{a_file}"), "good.txt"),
    ("train-workdir-under-file", train_argv("{a_file}/run"), "good.txt/run"),
    ("train-workdir-not-writable", train_argv("/sys/qt_run"), "/sys/qt_run"),  # even for root
    ("train-changed-model", train_argv("{W}", "--config.model.d_model=128"), "model.d_model"),
    ("train-changed-seed", train_argv("{W}", "--config.train.seed=3"), "train.seed"),
    ("train-changed-steps-no-flag", train_argv("{W}", "--config.train.num_steps=8"),
     "--allow_changed=train.num_steps"),
    ("train-allow-unsafe", train_argv("{W}", "--config.model.d_model=128",
                                      "--allow_changed=model.d_model"), "model.d_model"),
    # evaluate
    ("eval-missing-checkpoint", ["evaluate", "--checkpoint=/nope/ckpt"], "/nope/ckpt"),
    ("eval-all-corrupt", ["evaluate", "--checkpoint={corrupt}"], "corrupt"),
    ("eval-bad-hf-folder", ["evaluate", "--checkpoint={bad_hf}"], "bad_hf"),
    ("eval-foreign-config-json", ["evaluate", "--checkpoint={other_json}"], "other_json"),
    ("eval-folder-not-checkpoint", ["evaluate", "--checkpoint={plain_dir}"], "plain_dir"),
    ("eval-file-not-checkpoint", ["evaluate", "--checkpoint={params.msgpack}",
                                  "--model=opt_tiny"], "params.msgpack"),
    ("eval-wrong-model", ["evaluate", "--checkpoint={one_layer.msgpack}", "--model=opt_tiny"],
     "layers_1"),
    ("eval-bad-model", ["evaluate", "--model=opt_huge"], "opt_huge"),
    ("eval-bad-seeds", ["evaluate", "--checkpoint={W}", "--seeds=a,b"], "--seeds"),
    ("eval-bad-preset", ["evaluate", "--checkpoint={W}", "--preset=w3a3"], "--preset"),
    ("eval-bad-data", ["evaluate", "--checkpoint={W}", "--data=imagenet"], "--data"),
    ("eval-bad-int", ["evaluate", "--checkpoint={W}", "--num_eval_batches=abc"],
     "num_eval_batches"),
    ("eval-unknown-flag", ["evaluate", "--checkpoint={W}", "--bogus=1"], "bogus"),
    ("eval-config-override", ["evaluate", "--checkpoint={W}", "--config.train.seed=1"],
     "--config.train.seed"),
    ("eval-out-is-folder", ["evaluate", "--checkpoint={W}", "--out={plain_dir}"], "plain_dir"),
    # reproduce
    ("reproduce-bad-type", ["reproduce", "--workdir={base}/rep", "--config.train.num_steps=abc"],
     "train.num_steps"),
    ("reproduce-missing-config", ["reproduce", "--workdir={base}/rep", "--config=/nope/r.py"],
     "/nope/r.py"),
    ("reproduce-bad-preset", ["reproduce", "--workdir={base}/rep",
                              f"--config={REPRODUCE_CONFIG}:bogus"], "bogus"),
    ("reproduce-unknown-key", ["reproduce", "--workdir={base}/rep", "--config.train.nsteps=1"],
     "train.nsteps"),
    ("reproduce-bad-value", ["reproduce", "--workdir={base}/rep",
                             "--config.train.global_batch_size=-3"], "train.global_batch_size"),
    ("reproduce-bad-quant-preset", ["reproduce", "--workdir={base}/rep",
                                    "--config.reproduce.quant_preset=w3a3"], "w3a3"),
    ("reproduce-workdir-is-file", ["reproduce", "--workdir={a_file}"], "good.txt"),
    # tokenizer
    ("tokenizer-missing-file", ["tokenizer", "/nope/c.txt"], "/nope/c.txt"),
    ("tokenizer-empty-file", ["tokenizer", "{empty.txt}"], "empty.txt"),
    ("tokenizer-binary-file", ["tokenizer", "{binary.txt}"], "binary.txt"),
    ("tokenizer-no-files", ["tokenizer", "--kind=bpe"], "input files"),
    ("tokenizer-small-vocab", ["tokenizer", "{good.txt}", "--vocab_size=3"], "--vocab_size"),
    ("tokenizer-bad-kind", ["tokenizer", "{good.txt}", "--kind=unigram"], "--kind"),
    ("tokenizer-out-is-folder", ["tokenizer", "{good.txt}", "--out={plain_dir}"], "--out"),
]


def _fill(argv, workdir, files, base):
    """argv with every {name} replaced (names may hold dots: {good.txt})."""
    values = dict(files, W=workdir, base=base)
    return [re.sub(r"\{([\w.]+)\}", lambda m: values[m.group(1)], arg) for arg in argv]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(env, capfd, argv, expected):
    workdir, files, base = env
    before = snapshot(workdir)
    argv = _fill(argv, workdir, files, base)
    capfd.readouterr()
    assert cli.main(argv) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0]
    assert _fill([expected], workdir, files, base)[0] in lines[0], lines[0]
    assert snapshot(workdir) == before
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))
    assert not os.path.exists(os.path.join(base, "rep"))  # reproduce wrote nothing


def test_at_least_30_cases_across_the_four_commands():
    commands = [c[1][0] for c in CASES]
    assert len(CASES) >= 30 and {"train", "evaluate", "reproduce", "tokenizer"} <= set(commands)


def test_a_live_lock_refuses_a_second_trainer_and_a_stale_one_is_taken_over(env, capfd):
    workdir, _, _ = env
    before = snapshot(workdir)
    import socket
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = os.path.join(workdir, LOCK_FILE)
    try:
        with open(lock, "w") as f:  # a second trainer: another live process holds the workdir
            json.dump({"host": socket.gethostname(), "pid": live.pid, "started": 0,
                       "heartbeat": 0}, f)
        capfd.readouterr()
        assert cli.main(train_argv(workdir)) == 2
        err = capfd.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {live.pid}" in err and "in use" in err
        assert snapshot(workdir) == before and os.path.exists(lock)
    finally:
        live.kill()
        live.wait()
    # the holder died (kill -9 leaves its lock): the next trainer takes over and finishes
    assert cli.main(train_argv(workdir)) == 0  # already at step 4: nothing to train
    assert not os.path.exists(lock) and snapshot(workdir)["checkpoints/4/_CHECKPOINT_METADATA"]


def test_help_of_every_command_exits_0_and_lists_its_flags(capsys):
    expected = {"train": ["--config", "--workdir", "--allow_changed"],
                "evaluate": ["--checkpoint", "--model", "--seeds", "--preset", "--out"],
                "reproduce": ["--config", "--workdir"],
                "tokenizer": ["--kind", "--vocab_size", "--out"]}
    for command, names in expected.items():
        for flag in ("--help", "--helpfull"):
            assert cli.main([command, flag]) == 0
            out = capsys.readouterr().out
            assert out.startswith(f"usage: qtransformers {command}"), out[:200]
            for name in names:
                assert f"  {name}: " in out, (command, name)


def test_debug_shows_the_traceback(env, monkeypatch):
    from qtransformers.commandline import UserError
    with pytest.raises(UserError, match="/nope/ckpt"):
        cli.main(["evaluate", "--checkpoint=/nope/ckpt", "--debug"])
    monkeypatch.setenv("QT_DEBUG", "1")
    with pytest.raises(UserError, match="train.nsteps"):
        cli.main(train_argv("/tmp/unused", "--config.train.nsteps=3"))


@pytest.mark.parametrize("argv,expected", [
    (["train", f"--config={CONFIG}:vanilla", "--workdir={W}", "--config.model.d_model=128"],
     "model.d_model"),
    (["evaluate", "--checkpoint=/nope/ckpt"], "/nope/ckpt"),
], ids=["train", "evaluate"])
def test_console_output_is_one_line(env, argv, expected):
    """The real console script: no INFO log lines or warnings around the error line."""
    workdir, files, base = env
    argv = _fill(argv, workdir, files, base)
    run = subprocess.run([sys.executable, "-m", "qtransformers.cli", *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], run.stderr


def test_evaluate_falls_back_past_a_corrupt_newest_checkpoint(env, tmp_path, capfd):
    import numpy as np
    import orbax.checkpoint as ocp

    from qtransformers.evaluate.checkpoints import restore_trainer_workdir
    workdir, _, _ = env
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    corrupt_checkpoints(copy, "4")
    before = snapshot(copy)
    _, params, _ = restore_trainer_workdir(copy)
    err = capfd.readouterr().err
    assert "step 4: " in err and "evaluating checkpoint step 2" in err
    assert snapshot(copy) == before  # evaluation never moves checkpoints
    step2 = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    np.testing.assert_array_equal(
        np.asarray(params["decoder"]["layers_0"]["attention"]["query"]["kernel"]),
        np.asarray(step2["params"]["decoder"]["layers_0"]["attention"]["query"]["kernel"]))


def test_resume_with_more_steps_continues_only_when_allowed(env, tmp_path, capfd):
    workdir, _, _ = env
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    before = snapshot(copy)
    longer = train_argv(copy, "--config.train.num_steps=6")
    assert cli.main(longer) == 2  # refused: the schedule length is part of the run
    assert "--allow_changed=train.num_steps" in capfd.readouterr().err
    assert snapshot(copy) == before
    assert cli.main(longer + ["--allow_changed=train.num_steps"]) == 0
    with open(os.path.join(copy, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued at step 5, every step once
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["4", "6"]
    assert not os.path.exists(os.path.join(copy, "checkpoints_corrupt"))
    with open(os.path.join(copy, "config.json")) as f:
        record = json.load(f)
    assert record["config"]["train"]["num_steps"] == 6
    assert record["changed_on_resume"] == [
        {"field": "train.num_steps", "old": 4, "new": 6, "step": 4}]


def test_checkpoint_of_another_model_is_refused_not_quarantined(env, tmp_path, capfd):
    """Without config.json to compare with, the checkpoint's own shapes catch a changed model:
    a readable checkpoint of another model is never labelled corrupt or moved."""
    workdir, _, _ = env
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    os.remove(os.path.join(copy, "config.json"))
    before = snapshot(copy)
    capfd.readouterr()
    assert cli.main(train_argv(copy, "--config.model.d_model=128")) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint step 4" in lines[0], lines
    assert "holds another model" in lines[0] and "shape" in lines[0]
    assert snapshot(copy) == before and not os.path.exists(copy + "/checkpoints_corrupt")


def test_evaluate_keeps_the_argparse_spellings():
    """The argparse version accepted unique prefixes and '--flag value'; absl reads them too."""
    from qtransformers.evaluate.main import parse_args
    args = parse_args(["qtransformers evaluate", "--check=/x", "--num_eval", "2", "--per-layer",
                       "--seeds", "4,5", "--no_quantized_outliers"])
    assert (args.checkpoint, args.num_eval_batches, args.seeds) == ("/x", 2, "4,5")
    assert args.per_layer and args.no_quantized_outliers and args.batch_size == 8
