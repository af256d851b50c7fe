"""A quantized frozen base (QLoRA for diffusion): ``fp8`` storage of Linear/Conv2d weights, bitsandbytes ``nf4`` /
``int8`` through diffusers' ``BitsAndBytesConfig``, or torchao's int8 weight-only Linear layers (``int8-torchao``).

``fp8`` is ours, and works on CPU and GPU: each Linear and Conv2d weight of the UNet and text encoders is stored as
float8 (e4m3fn) with one fp32 scale per output channel, and dequantized per layer, inside the forward, to the
dtype the module was last moved to (``module.to(dtype)`` changes that compute dtype; the storage stays fp8).
Why not diffusers' ``enable_layerwise_casting`` (ModelMixin), which also stores fp8 and upcasts per layer: its hook
casts the layer back to fp8 after the forward, and autograd then finds the fp8 tensor where it saved the weight, so
the first backward through a LoRA layer fails ("expected scalar type Float but found Float8_e4m3fn", diffusers
0.42, CPU): it cannot train. It also casts without a scale. kohya's ``--fp8_base`` casts without a scale too and
relies on CUDA autocast to upcast, so it does not run on a CPU. Scales, measured on the ``tiny`` base's UNet
(every Linear/Conv2d in fp8, fixed inputs, output error relative to the full base): one per output channel
4.2-4.4%, one per tensor 5.3%, none 4.7%; per-channel costs 4 bytes per output channel, so it is the one used.

A layer's backward recomputes the weight from its fp8 storage (``_Fp8LinearFn``, ``_Fp8Conv2dFn``): autograd keeps
no full-precision copy of the base between forward and backward, and nothing of the input (the weight is frozen:
only the input's gradient flows), so the memory saved in storage is not spent again on saved tensors.

``int8-torchao`` is torchao's ``Int8WeightOnlyConfig`` through its ``quantize_``: every Linear weight of the UNet and
text encoders becomes an ``Int8Tensor`` (int8 values, one fp32 scale per output row: max|w| / 127.5), on CPU and GPU.
PEFT wraps such a layer in its ``TorchaoLoraLinear`` and trains the LoRA factors on top (checked: torchao 0.18,
PEFT 0.21, CPU); torchao's tensor has its own autograd (the input's gradient through the dequantized weight).
It quantizes Linear layers only, so a UNet that is mostly convolutions (SD1.x) keeps most of its bytes; torchao is
an optional dependency (``pip install torchao``).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

TORCHAO = "int8-torchao"
MODES = ("fp8", "int8", "nf4", TORCHAO)
AFTER_LOAD = ("fp8", TORCHAO)  # quantized here once the base is loaded in full precision (bitsandbytes: while loading)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what is quantized; the VAE stays as loaded


class QuantizationError(ConfigError):
    """A ``--quantize-base`` mode this machine or this base cannot do."""


def check_mode(mode: str | None) -> str | None:
    """``mode`` if it is one of MODES (or None), else a clear error."""
    if mode is None or mode in MODES:
        return mode
    raise QuantizationError(f"--quantize-base {mode!r}: expected one of {', '.join(MODES)}")


def check_available(mode: str | None) -> None:
    """Refuse, before any model is loaded, a mode this machine cannot run: nf4/int8 need CUDA and bitsandbytes,
    int8-torchao the torchao package."""
    check_mode(mode)
    if mode in (None, "fp8"):
        return
    if mode == TORCHAO:
        _check_torchao()
        return
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise QuantizationError(f"--quantize-base {mode} (bitsandbytes) needs {' and '.join(missing)}; "
                                "on this machine use --quantize-base fp8, which runs on CPU and GPU")


def _check_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"--quantize-base {TORCHAO} needs the torchao package (pip install torchao), which "
                                "is not installed; or use --quantize-base fp8, which needs nothing more")
    from peft.import_utils import is_torchao_available

    try:  # PEFT wraps torchao layers only from the version it supports (it raises for an older one)
        ok = is_torchao_available()
    except ImportError as e:
        raise QuantizationError(f"--quantize-base {TORCHAO}: {e} (pip install -U torchao)") from e
    if not ok:
        raise QuantizationError(f"--quantize-base {TORCHAO}: PEFT cannot use the installed torchao "
                                "(pip install -U torchao)")


# ------------------------------------------------------------------------------------------------ fp8 tensors
def quantize_fp8(weight: torch.Tensor, *, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, fp32 scale) with ``weight ≈ q.float() * scale``; the scale maps each output channel's (or the
    whole tensor's) largest magnitude to e4m3's largest finite value. An all-zero channel gets scale 1."""
    w = weight.detach().float()
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        amax = w.abs().amax().reshape([1] * w.dim())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, delta=None) -> torch.Tensor:
    """``q * scale`` (+ ``up @ down`` for a ``delta = (up, down)``) in fp32, then ``dtype`` (one rounding)."""
    w = q.to(torch.float32).mul_(scale)  # in place: one fp32 copy of the layer, not two
    if delta is not None:
        up, down = delta
        w.add_((up @ down).view(w.shape))
    return w.to(dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """``F.linear`` on the dequantized weight; backward dequantizes again (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, delta):
        ctx.save_for_backward(q, scale)
        ctx.delta = delta
        return F.linear(x, dequantize_fp8(q, scale, x.dtype, delta), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        grad_x = grad @ dequantize_fp8(q, scale, grad.dtype, ctx.delta) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class _Fp8Conv2dFn(torch.autograd.Function):
    """``F.conv2d`` on the dequantized weight (zero padding); backward: the input's gradient only."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, delta, stride, padding, dilation, groups):
        ctx.save_for_backward(q, scale)
        ctx.conf = (x.shape, delta, stride, padding, dilation, groups)
        return F.conv2d(x, dequantize_fp8(q, scale, x.dtype, delta), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        q, scale = ctx.saved_tensors
        shape, delta, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, dequantize_fp8(q, scale, grad.dtype, delta), grad, stride,
                                            padding, dilation, groups)
        return (grad_x,) + (None,) * 8


class _Fp8Layer:
    """Shared by Fp8Linear / Fp8Conv2d: fp8 ``weight_fp8`` and fp32 ``weight_scale`` buffers instead of the
    ``weight`` parameter; ``weight`` reads back the dequantized tensor (what PEFT, diffusers and our Blender read)."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    compute_dtype: torch.dtype  # PEFT reads this attribute (as for bitsandbytes layers) for its LoRA layers' dtype
    delta: tuple[torch.Tensor, torch.Tensor] | None = None  # (up [out, r], down [r, in·k·k]) fp32: a fused blend

    def _quantize_from(self, weight: torch.Tensor, per_channel: bool) -> None:
        q, scale = quantize_fp8(weight, per_channel=per_channel)
        del self._parameters["weight"]
        self.register_buffer("weight_fp8", q.to(weight.device))
        self.register_buffer("weight_scale", scale.to(weight.device))
        self.compute_dtype = weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward uses (dequantized, blend included), in the compute dtype: a new tensor, so
        writing into it changes nothing (a blend goes through ``set_delta``)."""
        return dequantize_fp8(self.weight_fp8, self.weight_scale, self.compute_dtype, self.delta)

    @property
    def base_weight(self) -> torch.Tensor:
        """W₀ as stored (dequantized, fp32), without any blend."""
        return dequantize_fp8(self.weight_fp8, self.weight_scale, torch.float32)

    def set_delta(self, delta: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """W = W₀ + up @ down from now on (None: W₀ again, exactly: the fp8 storage is never rewritten).

        This is how the Blender fuses adapters into an fp8 layer. Adding ΔW to W₀ and quantizing the sum again
        would round most of a LoRA's ΔW away (e4m3 keeps 3 mantissa bits: a step of 6-12% of each weight) and
        lose W₀ for an exact restore; a full-precision W per layer would give back the memory fp8 saved. The
        factors cost r·(in+out) numbers per layer, their product one small matmul per forward, added in fp32
        where the layer dequantizes anyway: no extra pass over the activations as unfused LoRA layers make."""
        self.delta = None if delta is None else tuple(t.to(self.weight_fp8.device, torch.float32) for t in delta)

    def _apply(self, fn, recurse=True):
        # ``module.to(device, dtype)`` / ``.half()``: the fp8 values and their scales move to the new device but keep
        # their dtypes; the dtype asked for becomes the compute dtype (the bias, a parameter, is cast as usual).
        q, scale = self._buffers.pop("weight_fp8"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.zeros((), dtype=torch.float32, device=q.device))
        finally:
            self._buffers["weight_fp8"], self._buffers["weight_scale"] = q, scale
        self._buffers["weight_fp8"] = q.to(probe.device)
        self._buffers["weight_scale"] = scale.to(probe.device)
        if self.delta is not None:
            self.delta = tuple(t.to(probe.device) for t in self.delta)
        if probe.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # not .to(fp8): storage
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 storage, compute {str(self.compute_dtype).replace('torch.', '')}"


class Fp8Linear(_Fp8Layer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.delta)


class Fp8Conv2d(_Fp8Layer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Conv2dFn.apply(x, self.weight_fp8, self.weight_scale, self.bias, self.delta, self.stride,
                                  self.padding, self.dilation, self.groups)


def _fp8_class(module: nn.Module):
    if type(module) is nn.Linear:
        return Fp8Linear
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return Fp8Conv2d
    return None


# Kept in full precision: the UNet's first and last convolutions (a few thousand weights, 0.3% of the tiny base's
# UNet bytes) carry the latent in and the prediction out; in fp8 they alone add a fifth of the output error (on
# ``tiny``, fixed inputs: 4.2% with them in fp8, 3.5% without). Norms and embeddings are no Linear/Conv2d: kept too.
SKIP = {"unet": ("conv_in", "conv_out")}


def quantize_module_fp8(module: nn.Module, *, per_channel: bool = True, skip: tuple[str, ...] = ()) -> int:
    """Every plain Linear / zero-padded Conv2d under ``module`` (PEFT's ``base_layer`` included), except those named
    in ``skip``, becomes its fp8 version in place (same object: references, hooks and PEFT wrappers stay valid).
    Returns how many."""
    count = 0
    for name, sub in list(module.named_modules()):
        cls = _fp8_class(sub)
        if cls is None or name in skip or name.removesuffix(".base_layer") in skip:
            continue
        weight = sub.weight
        sub.__class__ = cls
        sub._quantize_from(weight, per_channel)
        count += 1
    return count


def is_fp8(layer: nn.Module) -> bool:
    return isinstance(layer, _Fp8Layer)


def is_bnb_layer(layer: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (packed weights: nothing can be added to them in place)."""
    return type(layer._parameters.get("weight")).__name__ in ("Params4bit", "Int8Params")  # never fp8's property


def is_torchao_layer(layer: nn.Module) -> bool:
    """A layer whose weight is a torchao quantized tensor (int8 values and scales: no in-place add either). Told by
    the class's ancestry, so torchao is never imported for a base that does not use it."""
    weight = layer._parameters.get("weight")
    return weight is not None and any(c.__name__ == "TorchAOBaseTensor" for c in type(weight).__mro__)


def weight_shape(layer: nn.Module) -> tuple[int, ...] | None:
    """The shape of ``layer``'s weight as the model uses it, without dequantizing an fp8 one or reading a packed
    4-bit one as its storage shape ([n, 1] bytes); None for a layer without weight."""
    if is_fp8(layer):
        return tuple(layer.weight_fp8.shape)
    weight = layer._parameters.get("weight")
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return tuple(state.shape)
    weight = getattr(layer, "weight", None)
    return None if weight is None else tuple(weight.shape)


def delta_setter(layer: nn.Module):
    """How a fused blend puts ΔW = up @ down into ``layer`` when it must not rewrite the weight (None: a plain layer,
    whose weight the Blender rewrites itself). fp8 layers take the factors into their dequantization
    (``set_delta``); bitsandbytes and torchao layers get a forward hook adding ``(x @ downᵀ) @ upᵀ`` to the output:
    the unfused LoRA computation (costs a low-rank pass over the activations per forward, as PEFT's layers do).
    Fusing into an int8 weight would mean dequantize-add-requantize: the int8 step (max|w| / 127.5 per row) rounds
    small deltas away, and W₀ could not be restored exactly."""
    if is_fp8(layer):
        return layer.set_delta
    if not (is_bnb_layer(layer) or is_torchao_layer(layer)):
        return None

    def set_delta(delta):
        layer._stylelora_delta = None if delta is None else tuple(
            t.to(layer.weight.device, torch.float32) for t in delta)
        if getattr(layer, "_stylelora_hook", None) is None:
            layer._stylelora_hook = layer.register_forward_hook(_add_delta)

    return set_delta


def _add_delta(layer, args, output):
    delta = getattr(layer, "_stylelora_delta", None)
    if delta is None:
        return output
    up, down = delta
    x = args[0]
    return output + F.linear(F.linear(x.to(torch.float32), down), up).to(output.dtype)


# ------------------------------------------------------------------------------------------------ pipelines
def quantize_pipe_fp8(pipe, *, per_channel: bool = True) -> int:
    """fp8 storage for the UNet and text encoder(s) of ``pipe``; returns the number of layers quantized."""
    n = 0
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            n += quantize_module_fp8(module, per_channel=per_channel, skip=SKIP.get(name, ()))
    pipe._stylelora_quantized = "fp8"
    return n


def quantize_pipe_torchao(pipe) -> int:
    """torchao int8 weight-only storage for every Linear of the UNet and text encoder(s); returns how many layers."""
    import warnings

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    n = 0
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        quantize_(module, Int8WeightOnlyConfig())  # its default filter: nn.Linear modules
        for layer in module.modules():
            if is_torchao_layer(layer) and not getattr(layer, "_stylelora_autocast", False):
                layer.register_forward_pre_hook(_autocast_input)
                layer._stylelora_autocast = True
                n += 1
    # PEFT warns per LoRA layer that merge()/unmerge() need the requantizing config of a transformers-loaded model;
    # we never merge through PEFT (adapters are read out as factors; the Blender adds them in a forward hook).
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning)
    pipe._stylelora_quantized = TORCHAO
    return n


def _autocast_input(layer, args):
    """Under autocast, the input in the autocast dtype, as autocast gives an ``nn.Linear``: torchao's tensor takes
    ``F.linear`` before autocast sees it and computes in the input's dtype, so an fp32 activation stayed fp32 next to
    bf16 layers and the next GroupNorm failed ("mixed dtype (CPU): expect parameter to have scalar type of Float",
    bf16 training samples on CPU, torchao 0.18)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not torch.is_autocast_enabled(x.device.type):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    return None if x.dtype == dtype else (x.to(dtype), *args[1:])


def quantize_pipe(pipe, mode: str) -> int:
    """Quantize a loaded full-precision pipeline in one of the AFTER_LOAD modes; returns how many layers."""
    if mode == "fp8":
        return quantize_pipe_fp8(pipe)
    if mode == TORCHAO:
        return quantize_pipe_torchao(pipe)
    raise QuantizationError(f"--quantize-base {mode!r} is not applied after loading (expected one of "
                            f"{', '.join(AFTER_LOAD)})")


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """diffusers' PipelineQuantizationConfig for ``nf4`` / ``int8`` on the UNet and text encoder(s)."""
    from diffusers.quantizers import PipelineQuantizationConfig

    if mode == "nf4":
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}
        backend = "bitsandbytes_4bit"
    else:
        kwargs, backend = {"load_in_8bit": True}, "bitsandbytes_8bit"
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kwargs,
                                      components_to_quantize=list(COMPONENTS))


def quantization(pipe) -> str | None:
    """How the pipeline's base is stored: "fp8", "nf4", "int8", "int8-torchao", or None (full precision)."""
    mode = getattr(pipe, "_stylelora_quantized", None)
    if mode:
        return mode
    unet = getattr(pipe, "unet", None)
    if unet is not None and any(is_fp8(m) for m in unet.modules()):
        return "fp8"
    return None


def is_bnb(module: nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes-quantized layers (diffusers/transformers refuse to cast it)."""
    return any(is_bnb_layer(m) for m in module.modules())


def place(module: nn.Module, device, dtype) -> None:
    """``module.to(device, dtype)``, except a bitsandbytes-quantized one, which stays where it was loaded (on the
    GPU, its own dtypes): diffusers/transformers refuse to cast those."""
    if is_bnb(module):
        return
    module.to(device, dtype)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored (fp8 values, scales, fp32/fp16 rest), with the
    quantization constants bitsandbytes keeps beside a packed weight (``quant_state`` block maxima, ``SCB``), and
    the inner tensors of a torchao one (int8 values, scales)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if any(c.__name__ == "TorchAOBaseTensor" for c in type(t).__mro__):
            # a tensor subclass reports its logical size (numel × the original dtype's bytes); what is stored are
            # the inner tensors that __tensor_flatten__ names (for Int8Tensor: qdata, scale, zero_point if set)
            inner = [getattr(t, name, None) for name in t.__tensor_flatten__()[0]]
            total += sum(i.numel() * i.element_size() for i in inner if isinstance(i, torch.Tensor))
            continue
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        state2 = getattr(state, "state2", None)  # double quantization: the block maxima quantized in turn
        extras = [getattr(t, "SCB", None), getattr(state, "absmax", None), getattr(state, "offset", None),
                  getattr(state, "code", None), getattr(state2, "absmax", None), getattr(state2, "code", None)]
        total += sum(e.numel() * e.element_size() for e in extras if isinstance(e, torch.Tensor))
    return total


def check_adapter(adapter, pipe, path=None) -> str | None:
    """Warn (and return the warning) when ``adapter`` was trained on a quantized base (its metadata's
    ``stylelora.quantize_base``) and ``pipe`` is stored another way: it loads and works, but it learnt to correct
    a slightly different base, so its look can shift a little (benchmarks/style_quality.py --quantize-base
    measures how much)."""
    trained = (getattr(adapter, "metadata", None) or {}).get("stylelora.quantize_base")
    here = quantization(pipe)
    if not trained or trained == here:
        return None
    where = f"adapter {adapter.name!r}" + (f" ({path})" if path else "")
    msg = (f"{where} was trained on an {trained}-quantized base and is used on a "
           f"{here + '-quantized' if here else 'full-precision'} base: its style may come out slightly different "
           f"(load the base with --quantize-base {trained} to match the training)")
    log.warning(msg)
    return msg
