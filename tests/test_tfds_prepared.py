"""TFDS datasets must be prepared as ArrayRecord: clear errors for a tfrecord-only or missing
dataset (a real prepared dataset on disk, no TensorFlow, no network)."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from qtransformers.data import default_data_config, make_train_iterator
from qtransformers.data.sources import TFDSNotPreparedError, TFDSTexts, tfds_build_command


class TinyTexts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Five training and three test documents."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (and no checksums file to look up beside this module)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"document number {i}"}


def _cfg(data_dir, name="tiny_texts"):
    cfg = default_data_config()
    cfg.source, cfg.tfds_name, cfg.tfds_data_dir, cfg.seq_len = "tfds", name, str(data_dir), 16
    cfg.eval_split = "test"
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The dataset prepared as ArrayRecord (what `tfds build --file_format=array_record` does)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyTexts(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_array_record_dataset_reads_by_name_from_data_dir(prepared):
    docs = TFDSTexts(_cfg(prepared), "train")  # found from the files, no registered class
    assert sorted(docs[i] for i in range(len(docs))) == [f"document number {i}" for i in range(5)]
    assert next(make_train_iterator(_cfg(prepared), global_batch_size=2))["input_ids"].shape == (
        2, 16)


def test_tfrecord_only_dataset_names_the_array_record_build(prepared, tmp_path):
    # The same dataset as if `tfds build` had written tfrecord (the default file format).
    version_dir = tmp_path / "tiny_texts" / "1.0.0"
    version_dir.mkdir(parents=True)
    source = prepared / "tiny_texts" / "1.0.0"
    for name in os.listdir(source):
        data = (source / name).read_bytes()
        (version_dir / name.replace(".array_record-", ".tfrecord-")).write_bytes(data)
    info = json.loads((version_dir / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(TFDSNotPreparedError) as err:
        TFDSTexts(_cfg(tmp_path), "train")
    message = str(err.value)
    assert "prepared in" in message and "as tfrecord only" in message
    assert f"tfds build tiny_texts --file_format=array_record --data_dir={tmp_path}" in message
    assert "tfds convert_format" in message


def test_unprepared_dataset_is_never_downloaded(tmp_path):
    cfg = _cfg(tmp_path, name="lm1b")  # a registered dataset, absent from data_dir
    with pytest.raises(TFDSNotPreparedError, match="data.tfds_name='lm1b' split='train' could "
                                                   "not be opened.*is not prepared in"):
        make_train_iterator(cfg, global_batch_size=2)
    assert tfds_build_command(cfg) in str(pytest.raises(
        FileNotFoundError, TFDSTexts, cfg, "train").value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing downloaded or written
