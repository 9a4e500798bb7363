"""gs:// workdirs: every file the trainer writes goes through etils.epath, tested offline on a
fake object store (an in-memory fsspec file system with GCS's rules: no appends, folders exist
only while they hold objects) installed as epath's gs:// backend."""
import json
import logging
import os
from types import SimpleNamespace
from unittest import mock

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from orbax.checkpoint._src.path import gcs_utils

from qtransformers import fileio
from qtransformers.data import build_tokenizer, default_data_config
from qtransformers.data.vocab import word_vocab_path
from qtransformers.commandline import UserError
from qtransformers.evaluate.checkpoints import restore_trainer_workdir
from qtransformers.train import writers
from qtransformers.train.checkpointing import Checkpointer
from qtransformers.train.config import load_config_file
from qtransformers.train.loop import Trainer, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
    """In-memory objects keyed 'bucket/path'; no appends, no empty folders."""

    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return (path.split("://", 1)[1] if "://" in path else path).strip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super()._open(path, mode, **kwargs)

    def makedirs(self, path, exist_ok=False):
        pass  # GCS folders are implicit

    def mkdir(self, path, create_parents=True, **kwargs):
        pass


class FakeGCSBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
    def __init__(self):
        self.filesystem = FakeGCS(skip_instance_cache=True)
        self.filesystem.store, self.filesystem.pseudo_dirs = {}, [""]

    def fs(self, path):
        return self.filesystem


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """The fake store as epath's gs:// backend; runs in tmp_path to catch local 'gs:' folders."""
    backend = FakeGCSBackend()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)  # pylint: disable=protected-access
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: SimpleNamespace())
    monkeypatch.setattr(fileio, "remote_support_problem", lambda path: None)
    monkeypatch.chdir(tmp_path)
    yield backend.filesystem.store
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written as a local folder"


def _objects(store, prefix):
    return sorted(k[len(prefix):] for k in store if k.startswith(prefix))


def test_path_helpers_keep_urls_and_local_behaviour(gcs, tmp_path):
    assert fileio.is_remote(RUN) and not fileio.is_remote(str(tmp_path))
    assert fileio.absolute(RUN) == RUN and fileio.absolute("rel") == str(tmp_path / "rel")
    fileio.makedirs(f"{RUN}/a")  # a no-op on GCS
    assert not fileio.exists(f"{RUN}/a")
    fileio.write_text(f"{RUN}/a/b/c.txt", "hello")
    assert fileio.isdir(f"{RUN}/a") and fileio.isfile(f"{RUN}/a/b/c.txt")
    assert fileio.read_text(f"{RUN}/a/b/c.txt") == "hello"
    fileio.write_text(f"{RUN}/z/keep", "")  # the destination's folder must hold an object
    fileio.move(f"{RUN}/a", f"{RUN}/z/a")
    assert _objects(gcs, "bucket/run/") == ["z/a/b/c.txt", "z/keep"]
    fileio.write_text(tmp_path / "local.txt", "x")  # local: a tmp file, then os.replace
    assert os.listdir(tmp_path) == ["local.txt"]


def test_json_records_local_and_remote(gcs, tmp_path):
    import numpy as np
    value = {"a": np.float32(1.5), "b": np.arange(3), "c": [1, "x"]}
    for path in (str(tmp_path / "r.json"), f"{RUN}/r.json"):
        fileio.write_json(path, value)
        assert fileio.read_json(path) == {"a": 1.5, "b": [0, 1, 2], "c": [1, "x"]}
    assert os.listdir(tmp_path) == ["r.json"]  # the temporary file was renamed away


def test_metric_writer_stages_locally_and_copies(gcs, caplog):
    writer = writers.MetricWriter(RUN, sync_every_secs=0.0)
    staging = writer.local_dir
    assert not fileio.is_remote(staging) and os.path.isdir(staging)
    writer.write(1, "train", {"loss": 2.0})
    assert writers.read_metrics(RUN)[1]["loss"] == 2.0  # copied at once (sync_every_secs=0)
    writer.write(2, "eval", {"loss": 1.5, "nested": {"a": 1}})
    writer.close()
    assert not os.path.exists(staging)
    assert writers.read_metrics(RUN, "eval")[2]["nested"] == {"a": 1}
    assert any(name.startswith("events.out.tfevents")
               for name in _objects(gcs, "bucket/run/tensorboard/"))
    # A resumed run appends to the remote file; a copy that fails is logged, not raised.
    resumed = writers.MetricWriter(RUN, sync_every_secs=3600.0)
    resumed.write(3, "train", {"loss": 1.0})
    assert sorted(writers.read_metrics(RUN)) == [1]  # not synced yet
    with mock.patch.object(fileio, "copy_to", side_effect=OSError("network down")), \
            caplog.at_level(logging.WARNING):
        resumed.close()
    assert "network down" in caplog.text and os.path.isdir(resumed.local_dir)
    with open(os.path.join(resumed.local_dir, writers.METRICS_FILE), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_word_vocabulary_cache_on_gs(gcs):
    cfg = default_data_config()
    cfg.tokenizer, cfg.vocab_size = "word", 300
    first = build_tokenizer(cfg, workdir=RUN)
    path = word_vocab_path(cfg, RUN)
    assert os.fspath(path).startswith(f"{RUN}/tokenizer/word-") and fileio.isfile(path)
    with mock.patch("qtransformers.data.vocab._vocab_texts", side_effect=AssertionError):
        assert build_tokenizer(cfg, workdir=RUN).fingerprint() == first.fingerprint()


def test_checkpoint_quarantine_moves_steps_on_gs(gcs):
    checkpointer = Checkpointer(f"{RUN}/checkpoints", every=2, keep=3, async_save=False)
    assert checkpointer.directory == f"{RUN}/checkpoints" and checkpointer.all_steps() == []
    for step in (2, 4):  # finalized steps as orbax leaves them on GCS
        for name in ("state/x", "_CHECKPOINT_METADATA", "commit_success.txt"):
            fileio.write_text(f"{RUN}/checkpoints/{step}/{name}", "{}")
    checkpointer.manager.reload()
    assert checkpointer.all_steps() == [2, 4]
    checkpointer._quarantine([4])  # pylint: disable=protected-access
    assert checkpointer.all_steps() == [2]
    moved = _objects(gcs, "bucket/run/checkpoints_corrupt/")
    assert "README.txt" in moved and any(m.startswith("4-") and m.endswith("state/x")
                                         for m in moved)
    checkpointer.close()


def _tiny_config(**overrides):
    config = load_config_file(os.path.join(ROOT, "configs", "tiny_opt.py"), "gated")
    config.data.update(seq_len=16, tokenizer="word", vocab_size=256)
    config.model.update(num_layers=1, vocab_size=256)
    config.train.update(global_batch_size=8, num_steps=3, log_every=1, eval_every=0,
                        outlier_eval_every=0, checkpoint_every=0, **overrides)
    return config


def test_training_logs_config_and_vocab_to_a_gs_workdir(gcs):
    final = train_and_evaluate(_tiny_config(), RUN)  # checkpoint_every=0: no tensorstore I/O
    assert final["step"] == 3
    assert sorted(writers.read_metrics(RUN)) == [1, 2, 3]
    names = _objects(gcs, "bucket/run/")
    assert "config.json" in names and any(n.startswith("tokenizer/word-") for n in names)
    assert json.loads(fileio.read_text(f"{RUN}/config.json"))["resolved_model"]["num_layers"] == 1
    # `qtransformers evaluate --checkpoint gs://...` reads config.json remotely and looks for
    # orbax steps under gs://bucket/run/checkpoints (none were saved).
    with pytest.raises(UserError, match="no finalized checkpoint under gs://bucket/run/"):
        restore_trainer_workdir(RUN)


def test_missing_gcs_packages_is_a_config_error(monkeypatch):
    monkeypatch.setattr(fileio, "_importable", lambda module: False)
    with pytest.raises(ValueError, match="needs `pip install gcsfs google-cloud-storage`"):
        Trainer(_tiny_config(), RUN)
    monkeypatch.setattr(fileio, "_importable", lambda module: module != "google.cloud.storage")
    assert "google-cloud-storage" in fileio.remote_support_problem(RUN)
    assert "gcsfs" not in fileio.remote_support_problem(RUN)
    assert fileio.remote_support_problem("/local/dir") is None
