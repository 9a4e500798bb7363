"""The package face is lazy (PEP 562): `import qtransformers.ops` loads the pure math alone, and
`qt.<name>` still reaches every exported name."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_ops_loads_no_models_quant_or_evaluate():
    code = ("import sys, qtransformers.ops; "
            "print(sorted(m for m in sys.modules if m.startswith('qtransformers')))")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout
    loaded = eval(out)  # a printed list of module names
    assert loaded and all(m == "qtransformers" or m.startswith("qtransformers.ops")
                          for m in loaded), loaded


def test_top_level_names_resolve_lazily():
    import qtransformers as qt
    from qtransformers.nn.attention_spec import AttentionSpec
    from qtransformers.ops.softmax import clipped_softmax
    assert qt.clipped_softmax is clipped_softmax and qt.AttentionSpec is AttentionSpec
    for name in qt.__all__:
        assert getattr(qt, name) is not None
    assert "get_model_config" in dir(qt) and qt.convert.load_encoder is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        qt.nothing_here
