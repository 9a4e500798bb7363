"""Config files load and validate; bad configs fail with one clear error before any work."""
import glob
import os

import pytest

from qtransformers.train import config as config_lib
from qtransformers.train import main as main_lib
from qtransformers.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Trainer configs; configs/reproduce.py (presets of `qtransformers reproduce`) is tested in
# test_reproduce.py, configs/retrofit_minilm.py (`qtransformers retrofit`) in test_retrofit.py.
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if os.path.basename(p) not in ("reproduce.py", "retrofit_minilm.py"))


def tiny(arg="vanilla"):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_opt.py"), arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_validates(path):
    for method in ("vanilla", "clipped", "gated"):
        config = config_lib.load_config_file(path, f"method={method}")
        model = config_lib.validate_config(config)
        assert model.dtype == config.train.compute_dtype
        if method == "clipped":
            assert model.softmax == "clipped" and model.resolved_gamma < 0
        if method == "gated":
            assert model.gate != "none" and 0 < model.gate_init < 1
        if model.family == "opt":
            assert config.optim.decay_ln_scale == (method != "vanilla")


def test_config_files_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"bert_base.py", "bert_6l.py", "opt_125m.py", "opt_350m.py", "opt_1_3b.py",
            "vit_s16.py", "tiny_bert.py", "tiny_opt.py", "tiny_vit.py"} <= names


def test_cli_overrides_and_unknown_override(tmp_path):
    config, workdir = main_lib.parse_args([
        "prog", f"--config={ROOT}/configs/tiny_opt.py:gated", f"--workdir={tmp_path}",
        "--config.model.num_layers=1", "--config.optim.lr=0.5", "--config.mesh.shape.data=2"])
    assert config.model.method == "gated" and config.model.num_layers == 1
    assert config.optim.lr == 0.5 and workdir == str(tmp_path)
    assert config_lib.model_config_from(config).num_layers == 1
    code = main_lib.main(["prog", f"--config={ROOT}/configs/tiny_opt.py",
                          f"--workdir={tmp_path}/w", "--config.optim.lrr=1"])
    assert code == 2 and not os.path.exists(tmp_path / "w")


def test_unknown_keys_raise():
    config = tiny()
    config.train.unlock()
    config.train.stepz = 3
    with pytest.raises(ValueError, match=r"train\.stepz"):
        config_lib.validate_config(config)
    config = tiny()
    config.model.unlock()
    config.model.n_layers = 3
    with pytest.raises(ValueError, match="unknown model config keys.*n_layers"):
        config_lib.validate_config(config)
    with pytest.raises(ValueError, match="method"):
        config_lib.parse_config_arg("size=big", method="vanilla")


def test_bad_values_name_the_field():
    for section, key, value, pattern in (
            ("optim", "schedule", "step", "optim.schedule"),
            ("train", "compute_dtype", "float8", "train.compute_dtype"),
            ("model", "method", "magic", "model.method"),
            ("optim", "grad_accum_steps", 3, "grad_accum_steps=3"),
            ("train", "mlm_max_predictions", 20, "masked LM \\(bert\\) only")):
        config = tiny()
        config[section][key] = value
        with pytest.raises(ValueError, match=pattern):
            config_lib.validate_config(config)


@pytest.mark.parametrize("field,value,pattern", [
    ("train.global_batch_size", 12, r"global_batch_size=12 .*data-parallel size 8"),
    ("mesh.shape.data", 3, r"mesh.shape .*multiplies to 3 but there are 8 devices"),
    ("data.path", "/nonexistent/corpus", r"data.path='/nonexistent/corpus' does not exist"),
    ("model.vocab_size", 100, r"model.vocab_size=100 is smaller than the tokenizer's 261"),
])
def test_trainer_rejects_before_work(tmp_path, field, value, pattern):
    config = tiny()
    if field == "data.path":
        config.data.source = "text"
    section, *keys = field.split(".")
    node = config[section]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern):
        Trainer(config, str(workdir))
    assert not workdir.exists()


def test_tensor_axis_must_divide_parameters(tmp_path):
    config = tiny()
    config.model.vocab_size = 262  # 262 rows cannot split 4 ways
    config.mesh.shape.update(data=2, tensor=4)
    with pytest.raises(ValueError, match=r"cannot be split 4 ways.*model.vocab_size"):
        Trainer(config, str(tmp_path / "run"))
