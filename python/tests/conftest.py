"""Shared fixtures: where the model files, the C++ reference program and the C++ comparison are.

Nothing is skipped silently: a test that cannot run says why (pytest -rs lists the reasons; ./test.sh does).
  KVTRIM_MODELS         folder with stories260K.bin, tok512.bin, tinystories_valid_head.txt
                        (default: ../shared/models beside the repository)
  KVTRIM_REFERENCE_BIN  the C++ reference program (default: build/python/kvtrim_llama2_ref, built by ./test.sh)
  KVTRIM_COMPARE_BIN    the C++ comparison (default: build/examples/compare_policies, built by ./test.sh)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _path(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, default))


MODELS = _path("KVTRIM_MODELS", ROOT.parent / "shared" / "models")
REFERENCE_BIN = _path("KVTRIM_REFERENCE_BIN", ROOT / "build" / "python" / "kvtrim_llama2_ref")
COMPARE_BIN = _path("KVTRIM_COMPARE_BIN", ROOT / "build" / "examples" / "compare_policies")


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    files = {"model": MODELS / "stories260K.bin", "tokenizer": MODELS / "tok512.bin",
             "text": MODELS / "tinystories_valid_head.txt"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        pytest.skip(f"model files missing ({', '.join(missing)}); set KVTRIM_MODELS to the folder holding "
                    "stories260K.bin, tok512.bin and tinystories_valid_head.txt")
    return files


@pytest.fixture(scope="session")
def reference(models):
    """reference(args...) -> the C++ engine's JSON for these arguments (model files filled in)."""
    if not REFERENCE_BIN.exists():
        pytest.skip(f"C++ reference program missing ({REFERENCE_BIN}): build it with "
                    "cmake --build build --target kvtrim_llama2_ref, or set KVTRIM_REFERENCE_BIN")

    def run(*args: str) -> dict:
        cmd = [str(REFERENCE_BIN), "--model", str(models["model"]), "--tokenizer", str(models["tokenizer"]), *args]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    return run


@pytest.fixture(scope="session")
def hf_model_dir(models, tmp_path_factory) -> Path:
    """stories260K converted to a Hugging Face Llama directory by kvtrim.llama2c (once per session)."""
    pytest.importorskip("torch", reason="torch is not installed (pip install '.[hf]')")
    pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")
    from kvtrim import llama2c

    out = tmp_path_factory.mktemp("stories260K-hf")
    llama2c.convert(str(models["model"]), str(models["tokenizer"]), str(out))
    return out


@pytest.fixture(scope="session")
def hf_model(hf_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    import kvtrim.hf

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation=kvtrim.hf.ATTN_IMPLEMENTATION,
                                                dtype=torch.float32).eval()
