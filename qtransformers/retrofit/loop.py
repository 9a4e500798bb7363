"""The retrofit run: `run_retrofit(config, workdir) -> dict` (the final metrics).

    from qtransformers.retrofit import run_retrofit
    from configs.retrofit_minilm import get_config
    final = run_retrofit(get_config("gated,penalty=3e-3"), "runs/retrofit_gated")
    final["after"]["w8a8"]["recall@1"], final["after"]["outliers"]["max_abs"]

Steps: validate the config (UserError, before any work); load init_from (retrofit.source) and
apply the config's attention method; fine-tune with the jitted step (distillation from the
frozen source + penalties, retrofit.objectives; AdamW groups, retrofit.optim); measure on the
held-out retrieval task (retrofit.measure) before (eval.before) and after.

Workdir: config.json ({'config', 'resolved_model' (the student), 'source', 'tokenizer_folder'};
so the workdir is also a valid init_from and `evaluate --checkpoint` source), metrics.jsonl
(split 'train' every log_every steps: loss terms, lr, the batch's largest max|x| over the
penalty sites and the gate statistics; 'curve' at step 0 and every eval.every steps; 'before' /
'after'),
checkpoints/ (orbax: state = {'params', 'opt_state' leaves, 'step'}, every checkpoint_every
steps and at the end), final.json (the returned dict) and `done`.
A workdir holding `done` and the same config returns its final.json without work; one holding
checkpoints of the same config resumes from the newest (same batches as an uninterrupted run);
a different config is refused (UserError).

Returned dict: {'steps', 'train_seconds', 'seconds', 'train': the last logged train metrics,
'before': measure() at step 0 or None, 'after': measure() at the end, 'student': the student's
ModelConfig dict, 'eval_articles': N}.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.commandline import UserError
from qtransformers.models import build_model
from qtransformers.retrofit import objectives as obj
from qtransformers.retrofit.constraints import clip_bounds, clip_weights
from qtransformers.retrofit.config import architecture_of, method_of, validate
from qtransformers.retrofit.data import (TrainBatches, encoder_tokenizer, held_out_task,
                                         training_texts)
from qtransformers.retrofit.measure import measure, quick_recall
from qtransformers.retrofit.optim import make_retrofit_optimizer
from qtransformers.retrofit.source import check_architecture, load_source_model, retrofit_model

DONE = "done"
FINAL = "final.json"


def _config_dict(config: Any) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_workdir(workdir: str, config: Any) -> bool:
    """True when workdir already ran this config; UserError when it ran another one."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        saved = _read_json(path).get("config")
    except (OSError, ValueError):
        saved = None
    if saved != _config_dict(config):
        raise UserError(f"--workdir {workdir} holds a run of another config (its config.json "
                        "differs); give a new --workdir or the config that made it.")
    return True


def encoder_view(cfg: Any, params: Any) -> tuple[Any, Any]:
    """(config, params) of a sentence encoder over the same encoder: a model with an MLM head is
    evaluated mean-pooled without its head."""
    if cfg.pooling is not None:
        return cfg, params
    return cfg.replace(pooling="mean"), {k: v for k, v in params.items() if k != "mlm_head"}


def make_train_step(student: Any, teacher: Any, tx: Any, r: Any, bounds: Any = None):
    """The jitted update (params, opt_state, teacher_params, batch) -> (params, opt_state,
    metrics); r is config.retrofit; bounds (retrofit.constraints.clip_bounds): the weight clip
    applied after every update (None: no clip)."""
    weights = {"embedding": r.embedding_weight, "hidden": r.hidden_weight,
               "logits": r.logits_weight, "max_abs": r.penalty, "kurtosis": r.kurtosis_penalty}

    def loss_fn(params, teacher_out, teacher_blocks, batch):
        out, acts = obj.forward(student, params, batch)
        mask = batch["attention_mask"]
        terms = {}
        if r.embedding_weight:
            terms["embedding"] = obj.embedding_distillation(out, teacher_out)
        if r.hidden_weight:
            terms["hidden"] = obj.hidden_distillation(acts["block_output"], teacher_blocks, mask)
        if r.logits_weight:
            terms["logits"] = obj.logits_distillation(out, teacher_out, mask,
                                                      r.logits_temperature)
        sites = obj.penalty_activations(acts, r.penalty_sites)
        terms["max_abs"] = obj.max_abs_penalty(sites, mask)
        if r.kurtosis_penalty:
            terms["kurtosis"] = obj.kurtosis_penalty(sites, mask)
        loss = sum(weights[k] * v for k, v in terms.items())
        peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x) * mask[..., None]) for x in sites]))
        return loss, {**terms, "loss": loss, "batch_max_abs": peak}

    @jax.jit
    def step(params, opt_state, teacher_params, batch):
        teacher_out, teacher_acts = obj.forward(teacher, teacher_params, batch)
        teacher_out = jax.lax.stop_gradient(teacher_out)
        blocks = [jax.lax.stop_gradient(b) for b in teacher_acts["block_output"]]
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, teacher_out, blocks, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        import optax
        params = optax.apply_updates(params, updates)
        if bounds is not None:
            params = clip_weights(params, bounds)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics
    return step


def _gate_stats(model: Any, params: Any, batch: dict) -> dict[str, float]:
    """Mean / min / max of sigmoid(gate) over the real tokens of one batch (empty: no gates)."""
    _, cols = _gate_apply(model, params, batch)
    from flax.traverse_util import flatten_dict
    values = [v[0] for k, v in flatten_dict(cols.get("intermediates", {})).items()
              if k[-1] == "gate_values"]
    if not values:
        return {}
    mask = np.asarray(batch["attention_mask"], bool)
    flat = np.concatenate([np.asarray(v)[mask].ravel() for v in values])
    return {"gate_mean": float(flat.mean()), "gate_min": float(flat.min()),
            "gate_max": float(flat.max())}


@functools.partial(jax.jit, static_argnums=(0,))
def _gate_apply(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], mutable=["intermediates"])


class _Checkpoints:
    """orbax checkpoints of {'params', 'opt_state': {index: leaf}, 'step'} under workdir."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "data"))

    def save(self, step: int, params: Any, opt_state: Any) -> None:
        leaves = {str(i): x for i, x in enumerate(jax.tree.leaves(opt_state))}
        state = {"params": params, "opt_state": leaves, "step": np.int64(step)}
        self.manager.save(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state),
            data=self.ocp.args.JsonSave({"step": step})), force=True)
        self.manager.wait_until_finished()

    def restore(self, params: Any, opt_state: Any) -> tuple[int, Any, Any] | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        leaves, treedef = jax.tree.flatten(opt_state)
        target = {"params": params, "opt_state": {str(i): x for i, x in enumerate(leaves)},
                  "step": np.int64(0)}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype),
                                target)
        restored = self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract)))["state"]
        opt = jax.tree.unflatten(treedef, [restored["opt_state"][str(i)]
                                           for i in range(len(leaves))])
        return step, restored["params"], opt


def run_retrofit(config: Any, workdir: str, log: Any = print) -> dict[str, Any]:
    """Retrofits config.train.init_from into workdir; returns the final metrics (module doc).

    Args:
      config: a ConfigDict of retrofit.config.default_config()'s layout (configs/
        retrofit_minilm.py:get_config builds one).
      workdir: local folder for config.json, metrics.jsonl, checkpoints/, final.json, done.
      log: gets one progress line at a time (print by default).
    Raises:
      UserError (one line) for a bad config, init_from, workdir or data.
    """
    validate(config)
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    seen = _check_workdir(workdir, config)
    if seen and os.path.isfile(os.path.join(workdir, DONE)):
        log(f"{workdir}: finished retrofit of the same config, reusing {FINAL}")
        return _read_json(os.path.join(workdir, FINAL))
    t, r, d, e = config.train, config.retrofit, config.data, config.eval

    source = load_source_model(t.init_from)
    check_architecture(source.config, architecture_of(config))
    if source.config.family != "bert":
        raise UserError(f"init_from {t.init_from} holds a {source.config.family} model; the "
                        "retrofit's retrieval evaluation and distillation support BERT encoders.")
    has_head = source.config.pooling is None
    if r.embedding_weight and has_head:
        raise UserError(f"init_from {t.init_from} is a model with an MLM head, not a sentence "
                        "encoder: set retrofit.embedding_weight=0 and distil hidden states or "
                        "logits (retrofit.hidden_weight / logits_weight).")
    if r.logits_weight and not has_head:
        raise UserError(f"init_from {t.init_from} is a sentence encoder without an MLM / LM "
                        "head: retrofit.logits_weight needs one; use embedding_weight / "
                        "hidden_weight.")
    student_cfg, params = retrofit_model(source.config, source.params, method_of(config),
                                         r.gate_kernel_std, config.seed)
    bounds = None  # the weight clip's bounds come from the source's tensors (same on resume)
    if r.weight_clip:
        bounds = clip_bounds(params, r.weight_clip)
        params = clip_weights(params, bounds)
    tokenizer_folder = d.tokenizer or source.tokenizer_folder
    if not tokenizer_folder:
        raise UserError(f"init_from {t.init_from} records no tokenizer; set data.tokenizer to "
                        "the folder of its tokenizer.json / vocab.txt.")
    try:
        train_tok = encoder_tokenizer(tokenizer_folder, t.seq_len)
        eval_tok = encoder_tokenizer(tokenizer_folder, d.eval_max_tokens)
        texts = training_texts(d.eval_fraction)
        task = held_out_task(eval_tok, d.eval_fraction, d.num_eval_articles)
        curve_task = (held_out_task(eval_tok, d.eval_fraction, e.curve_articles)
                      if e.every else None)
        batches = TrainBatches(train_tok.encode(texts), t.batch_size, t.seq_len,
                               train_tok.pad_id, config.seed)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"retrofit data: {str(err).splitlines()[0]}") from None
    if train_tok.vocab_size > student_cfg.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_folder} has {train_tok.vocab_size} tokens, "
                        f"the model only {student_cfg.vocab_size}; set data.tokenizer to the "
                        "model's own tokenizer.")
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"config": _config_dict(config), "resolved_model": student_cfg.to_dict(),
                   "source": {"spec": source.spec, "path": source.path, "kind": source.kind,
                              "model": source.config.to_dict()},
                   "tokenizer_folder": os.path.abspath(tokenizer_folder)}, f, indent=1)

    teacher, student = build_model(source.config), build_model(student_cfg)
    eval_cfg, _ = encoder_view(student_cfg, params)
    eval_model = build_model(eval_cfg)
    tx, schedules = make_retrofit_optimizer(config.optim, r.trainable, t.num_steps)
    opt_state = tx.init(params)
    checkpoints = _Checkpoints(workdir, t.keep_checkpoints)
    step0 = 0
    restored = checkpoints.restore(params, opt_state)
    if restored is not None:
        step0, params, opt_state = restored
        log(f"resuming {workdir} from step {step0}")
    from qtransformers.train.writers import MetricWriter
    writer = MetricWriter(workdir, keep_through_step=step0)
    mkw = dict(probe_batches=e.probe_batches, calib_batches=e.calib_batches,
               act_bits=e.act_bits, seed=config.seed)
    before = None
    if e.before and step0 == 0:
        before = measure(task, eval_model, encoder_view(student_cfg, params)[1], **mkw)
        writer.write(0, "before", _flat_metrics(before))
        log(f"before: {_summary(before)} ({time.time() - start:.0f} s)")
    elif os.path.isfile(os.path.join(workdir, "before.json")):
        before = _read_json(os.path.join(workdir, "before.json"))
    if before is not None:
        _write_json(os.path.join(workdir, "before.json"), before)

    teacher_params = source.params
    train_step = make_train_step(student, teacher, tx, r, bounds)
    train_start, last = time.time(), {}
    if curve_task is not None and step0 == 0:
        curve = quick_recall(curve_task, eval_model, encoder_view(student_cfg, params)[1])
        writer.write(0, "curve", curve)
    for step in range(step0 + 1, t.num_steps + 1):
        batch = batches.batch(step - 1)
        params, opt_state, metrics = train_step(params, opt_state, teacher_params, batch)
        if step % t.log_every == 0 or step == t.num_steps:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            last.update(_gate_stats(student, params, batch))
            last["lr"] = float(schedules["old"](step - 1))
            writer.write(step, "train", last)
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"retrofit loss is {last['loss']} at step {step}; "
                                         "lower optim.lr or the penalty.")
            log(f"step {step}/{t.num_steps}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in last.items() if k != "lr")
                + f" ({time.time() - train_start:.0f} s)")
        if curve_task is not None and (step % e.every == 0 or step == t.num_steps):
            curve = quick_recall(curve_task, eval_model, encoder_view(student_cfg, params)[1])
            writer.write(step, "curve", curve)
            log(f"step {step}: {curve}")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.num_steps:
            checkpoints.save(step, params, opt_state)
    train_seconds = time.time() - train_start
    if t.num_steps > step0 or restored is None:  # steps=0 too: the workdir stays an init_from
        checkpoints.save(t.num_steps, params, opt_state)
    after = measure(task, eval_model, encoder_view(student_cfg, params)[1], **mkw)
    writer.write(t.num_steps, "after", _flat_metrics(after))
    writer.close()
    log(f"after: {_summary(after)}")
    final = {"steps": int(t.num_steps), "train_seconds": train_seconds,
             "seconds": time.time() - start, "train": last, "before": before, "after": after,
             "student": student_cfg.to_dict(), "eval_articles": len(task.queries)}
    _write_json(os.path.join(workdir, FINAL), final)
    with open(os.path.join(workdir, DONE), "w", encoding="utf-8") as f:
        f.write("finished\n")
    return final


def _write_json(path: str, value: Any) -> None:
    from qtransformers.evaluate.report import write_json
    write_json(path, value)


def _flat_metrics(m: dict[str, Any]) -> dict[str, Any]:
    out = {f"{k}/{n}": v for k in m if k != "outliers" for n, v in m[k].items()}
    if "outliers" in m:
        out.update({f"outliers/{k}": v for k, v in m["outliers"].items()
                    if isinstance(v, (int, float))})
    return out


def _summary(m: dict[str, Any]) -> str:
    keys = [k for k in m if k not in ("outliers",)]
    text = ", ".join(f"{k} R@1 {m[k]['recall@1']:.3f}" for k in keys)
    if "outliers" in m:
        o = m["outliers"]
        text += (f"; max|x| {o['max_abs']:.1f} at {o['site']} ch {o['channel']} "
                 f"(peak/median {o['peak_over_median']:.0f}x)")
    return text
