"""PTQ for Flax Linen models that do not use our QuantPoints: quantize chosen module outputs.

An `nn.intercept_methods` interceptor treats the output of every module of the chosen types
whose path matches a regex as a QuantPoint at that module's path (same collections, same
estimators, same sequential calibration as `quant.calibrate`):

    import flax.linen as nn
    import jax, jax.numpy as jnp
    from qtransformers.quant import (OutputInterceptor, QuantConfig, calibrate_intercepted,
                                     quantize_params, quantized_apply)

    class MLP(nn.Module):  # any stock Flax model
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(x)
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10, name="head")(x)

    model = MLP()
    x = jnp.ones((8, 32))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    config = QuantConfig(num_calibration_batches=4, head_patterns=(r"^head/",))
    # Quantize the outputs of every Dense and LayerNorm except the head.
    interceptor = OutputInterceptor(module_types=(nn.Dense, nn.LayerNorm),
                                    path_regex=r"^(?!head$)")
    qparams = quantize_params(params, config)       # kernels, scales; not biases, not 'head'
    qranges = calibrate_intercepted(model, qparams, [x] * 4, config, interceptor)
    y = quantized_apply(model, qparams, qranges, x, config, interceptor)
    # qranges == {'Dense_0': {'x_min': ..., 'x_max': ...}, 'LayerNorm_0': {...}}

Batches are the model's single positional input (an array) or, with `input_key`, a dict.
Only `__call__` outputs that are single arrays are quantized.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable

import flax.linen as nn
import jax

from qtransformers.nn.quant_point import (QRANGES, QuantContext, QuantPoint, apply_point,
                                          point_path, quant_context)
from qtransformers.quant.calibrate import calibrate_fn, discover_points, no_token_mask
from qtransformers.quant.config import QuantConfig
from qtransformers.quant.evaluate import validate_qranges


@dataclasses.dataclass(frozen=True)
class OutputInterceptor:
    """`nn.intercept_methods` interceptor: QuantPoint behaviour on chosen module outputs.

    Attributes:
      module_types: Linen module classes whose `__call__` output is quantized.
      path_regex: re.search pattern on the module's '/'-joined path (e.g. 'Dense_0',
        'encoder/layer_1/attn/out').
    """

    module_types: tuple[type, ...] = (nn.Dense,)
    path_regex: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.module_types, tuple) or not all(
                isinstance(t, type) and issubclass(t, nn.Module) for t in self.module_types):
            raise ValueError("OutputInterceptor.module_types must be a tuple of flax.linen Module "
                             f"classes, got {self.module_types!r}")
        try:
            re.compile(self.path_regex)
        except re.error as err:
            raise ValueError(f"OutputInterceptor.path_regex {self.path_regex!r} is not a valid "
                             f"regex: {err}") from None

    def __call__(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name != "__call__" or isinstance(module, QuantPoint)
                or not isinstance(module, self.module_types)
                or not isinstance(out, jax.Array)
                or not re.search(self.path_regex, point_path(module))):
            return out
        return apply_point(module, out, "tokens")


@dataclasses.dataclass(frozen=True)
class InterceptedApply:
    """ApplyFn `(variables, batch, mutable) -> (output, collections)` of a stock model.

    Attributes:
      model: the Linen module.
      interceptor: the OutputInterceptor.
      input_key: None when a batch is the input array, else the batch dict's key of it.
    """

    model: nn.Module
    interceptor: OutputInterceptor
    input_key: str | None = None

    def __call__(self, variables: Any, batch: Any, mutable: list) -> tuple[Any, Any]:
        x = batch if self.input_key is None else batch[self.input_key]
        with nn.intercept_methods(self.interceptor):
            return self.model.apply(variables, x, mutable=mutable)


def calibrate_intercepted(model: nn.Module, params: Any, batches: Iterable[Any],
                          config: QuantConfig, interceptor: OutputInterceptor, *,
                          sequential: bool = True, input_key: str | None = None) -> dict:
    """Activation ranges of the intercepted outputs (see quant.calibrate for the protocol).

    Returns:
      qranges keyed by module path: {path...: {'x_min': (), 'x_max': ()}}.
    """
    apply_fn = InterceptedApply(model, interceptor, input_key)
    return calibrate_fn(apply_fn, params, batches, config, sequential=sequential,
                        token_mask_fn=no_token_mask)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _quantized_apply(apply_fn: InterceptedApply, ctx: QuantContext, params: Any, qranges: Any,
                     batch: Any) -> Any:
    variables = {"params": params}
    if qranges:
        variables[QRANGES] = qranges
    with quant_context(ctx):
        return apply_fn(variables, batch, [])[0]


def quantized_apply(model: nn.Module, params: Any, qranges: Any, batch: Any, config: QuantConfig,
                    interceptor: OutputInterceptor, *, input_key: str | None = None,
                    validate: bool = True) -> Any:
    """The model output with intercepted outputs fake-quantized (jitted; ranges traced).

    Args:
      params: weights (quantize_params(params, config) for W8A8).
      qranges: from calibrate_intercepted (None for act_granularity='per_token').
      batch: the model input (or a dict holding it under input_key).
      validate: check qranges against the intercepted paths first (one abstract trace).
    """
    apply_fn = InterceptedApply(model, interceptor, input_key)
    dynamic = config.act_granularity == "per_token"
    if validate and not dynamic:
        validate_qranges(qranges, discover_points(apply_fn, params, batch))
    ctx = QuantContext(bits=config.act_bits, granularity=config.act_granularity)
    return _quantized_apply(apply_fn, ctx, params, None if dynamic else qranges, batch)
