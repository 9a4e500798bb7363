"""Retrofit a pretrained model: start from it, apply gated attention (fine-tuning mode) or a
clipped softmax, and fine-tune briefly with distillation from the frozen original plus optional
pressure on activation size, then measure outliers and quantized retrieval before / after.

    from qtransformers.retrofit import run_retrofit
    final = run_retrofit(config, "runs/retrofit_gated")   # see retrofit.loop

Modules: source (init_from, the student), objectives (losses), optim (parameter groups),
data (Wikipedia batches, held-out task), measure, loop (run_retrofit), main (the command).
"""
from __future__ import annotations

__all__ = ["run_retrofit"]


def run_retrofit(config, workdir, log=print):  # noqa: D103 - documented in retrofit.loop
    from qtransformers.retrofit.loop import run_retrofit as run
    return run(config, workdir, log)


run_retrofit.__doc__ = """Retrofits config.train.init_from into workdir and returns the final
metrics dict; see qtransformers.retrofit.loop.run_retrofit."""
