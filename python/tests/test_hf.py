"""Hugging Face transformers + kvtrim on the real model: stories260K converted by kvtrim.llama2c, run through
transformers.LlamaForCausalLM with a KVTrimCache, against the C++ llama2.c engine (examples/llama2) on the same
windows: perplexity (relative difference <= 1e-4), greedy text, StreamingLLM and H2O at budget 64."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[hf]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")

import kvtrim  # noqa: E402
import kvtrim.hf  # noqa: E402

from conftest import COMPARE_BIN, MODELS, ROOT  # noqa: E402

BYTES = 6000  # 5 windows of 512 tokens of the validation text
WINDOW, PROMPT = 512, 256
REL_TOL = 1e-4


def hf_window_logits(model, window, policy, budget, protocol):
    """Logits of the evaluated positions of one window (the protocols of compare_policies)."""
    L = len(window)
    ids = torch.tensor([window])
    cache = kvtrim.hf.KVTrimCache(model, policy, budget=budget, prompt="stream" if protocol == "stream" else "compress")
    kw = {kvtrim.hf.cache_argument(model): cache}
    with torch.no_grad():
        if protocol == "stream":
            return model(ids[:, :L - 1], **kw).logits[0], 0, cache
        first = min(PROMPT, L - 2)
        model(ids[:, :first], **kw)
        return model(ids[:, first:L - 1], **kw).logits[0], first, cache


def perplexities(reference, model, policy, budget, protocol):
    ref = reference("--text", str(MODELS / "tinystories_valid_head.txt"), "--bytes", str(BYTES), "--window", str(WINDOW),
                    "--policy", policy, "--budget", str(budget), "--protocol", protocol, "--prompt", str(PROMPT))
    nll, n, top1_equal = 0.0, 0, True
    for window, r in zip(ref["windows"], ref["results"]):
        logits, first, cache = hf_window_logits(model, window, policy, budget or len(window), protocol)
        assert first == r["first"]
        lp = torch.log_softmax(logits.double(), -1)
        targets = torch.tensor(window[first + 1:])
        nll -= lp[torch.arange(len(targets)), targets].sum().item()
        n += len(targets)
        top1_equal &= logits.argmax(-1).tolist() == r["top1"]
    ref_ppl = math.exp(sum(r["nll"] for r in ref["results"]) / sum(r["n"] for r in ref["results"]))
    assert n == sum(r["n"] for r in ref["results"]) and len(ref["windows"]) == 5
    return ref_ppl, math.exp(nll / n), top1_equal


@pytest.mark.parametrize("protocol", ["stream", "prompt"])
@pytest.mark.parametrize("policy,budget", [("full", 0), ("streaming", 64), ("h2o", 64)])
def test_perplexity_equals_the_cpp_engine(reference, hf_model, policy, budget, protocol):
    cpp, hf, top1_equal = perplexities(reference, hf_model, policy, budget, protocol)
    rel = abs(hf - cpp) / cpp
    print(f"{policy}@{budget or 'window'} {protocol}: C++ {cpp:.8f}  HF {hf:.8f}  relative difference {rel:.2e}")
    assert rel <= REL_TOL
    assert top1_equal


def test_greedy_200_tokens_equal_the_cpp_engine(reference, hf_model, hf_model_dir):
    from transformers import AutoTokenizer

    ref = reference("--generate", "200")["generate"]
    cache = kvtrim.hf.KVTrimCache(hf_model, "full", budget=200)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([[1]]), **{kvtrim.hf.cache_argument(hf_model): cache},
                                max_new_tokens=200, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[0, 1:].tolist()
    assert tokens == ref["tokens"] and len(tokens) == 200
    text = AutoTokenizer.from_pretrained(hf_model_dir).decode(tokens)
    assert text == ref["text"]
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    assert cache.kv.size(0, 0) == 200  # BOS + 199 generated tokens fed back


def test_tokenizer_equals_llama2c(reference, hf_model_dir, models):
    from transformers import AutoTokenizer

    ref = reference("--text", str(models["text"]), "--bytes", "20000", "--window", "512")
    tok = AutoTokenizer.from_pretrained(hf_model_dir)
    text = open(models["text"], "rb").read(20000).decode("utf-8", errors="ignore")
    assert tok(text, add_special_tokens=False)["input_ids"] == ref["text_tokens"]
    assert tok("Once upon a time")["input_ids"][0] == 1  # BOS first, as llama2.c's encode(bos=true)


def test_kvtrim_full_cache_equals_transformers_own_attention(hf_model_dir):
    """An independent check: the 'kvtrim' path with FullCache gives the logits of transformers' eager attention
    with its own DynamicCache, over a prompt and 20 generated steps."""
    from transformers import AutoModelForCausalLM, DynamicCache

    eager = AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation="kvtrim").eval()
    kw = kvtrim.hf.cache_argument(eager)
    ids = torch.tensor([[1, 400, 261, 300, 290, 310, 280, 350]])
    a_cache, b_cache = DynamicCache(config=eager.config), kvtrim.hf.KVTrimCache(ours, "full", budget=64)
    with torch.no_grad():
        a, b = eager(ids, **{kw: a_cache}).logits, ours(ids, **{kw: b_cache}).logits
        for _ in range(20):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            nxt = a[:, -1:].argmax(-1)
            a, b = eager(nxt, **{kw: a_cache}).logits, ours(nxt, **{kw: b_cache}).logits
    assert b_cache.get_seq_length() == a_cache.get_seq_length() == ids.shape[1] + 20


def test_kvtrim_attention_without_a_kvtrim_cache_is_sdpa(hf_model_dir):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation="kvtrim").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 400, 261, 300, 290]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, use_cache=False).logits, sdpa(ids, use_cache=False).logits)


def test_cache_errors_are_clear(hf_model_dir, hf_model):
    from transformers import AutoModelForCausalLM

    kw = kvtrim.hf.cache_argument(hf_model)
    plain = AutoModelForCausalLM.from_pretrained(hf_model_dir, attn_implementation="eager").eval()
    with pytest.raises(kvtrim.Error, match="attention implementation to be 'kvtrim'"):
        plain(torch.tensor([[1, 2]]), **{kw: kvtrim.hf.KVTrimCache(plain, "h2o", budget=8)})
    with pytest.raises(kvtrim.Error, match="serves one sequence"):
        hf_model(torch.tensor([[1, 5], [1, 6]]), **{kw: kvtrim.hf.KVTrimCache(hf_model, "h2o", budget=8)})
    with pytest.raises(kvtrim.Error, match="never evicts"):
        hf_model(torch.tensor([[1] * 10]), **{kw: kvtrim.hf.KVTrimCache(hf_model, "full", budget=8)})
    kvtrim.hf.enable(plain)
    assert plain.config._attn_implementation == "kvtrim"


def test_every_policy_runs_through_generate(hf_model):
    rng = np.random.default_rng(0)
    calib = kvtrim.EigenCalibrator(n_layers=5, n_kv_heads=4, n_q_heads=8, head_dim=8)
    taps = kvtrim.hf.KVTrimCache(hf_model, "full", budget=64, tap=lambda l, q, k, v: calib.add(l, k, v, q))
    with torch.no_grad():
        hf_model(torch.tensor([[1] + rng.integers(3, 512, 63).tolist()]), **{kvtrim.hf.cache_argument(hf_model): taps})
    basis = calib.basis(energy=0.9)
    for policy in kvtrim.policies():
        budget = 80 if kvtrim.never_evicts(policy) else 40
        cache = kvtrim.hf.KVTrimCache(hf_model, policy, budget=budget,
                                      basis=basis if kvtrim.needs_basis(policy) else None)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([[1, 400, 261, 300]]), **{kvtrim.hf.cache_argument(hf_model): cache},
                                    max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.shape == (1, 44), policy
        assert max(max(row) for row in cache.kv.sizes()) <= budget


def test_compare_script_gives_the_cpp_comparison_figures(hf_model_dir, models, tmp_path):
    """examples/python/compare.py on the converted model against examples/compare_policies on the llama2.c
    checkpoint: StreamingLLM and H2O at budget 64, both protocols, same text."""
    if not COMPARE_BIN.exists():
        pytest.skip(f"C++ comparison missing ({COMPARE_BIN}): build it with cmake --build build --target "
                    "compare_policies, or set KVTRIM_COMPARE_BIN")
    cpp_dir, py_dir = tmp_path / "cpp", tmp_path / "py"
    plots = importlib.util.find_spec("matplotlib") is not None  # the plots are checked where matplotlib is
    subprocess.run([str(COMPARE_BIN), "--model", str(models["model"]), "--tokenizer", str(models["tokenizer"]),
                    "--text", str(models["text"]), "--bytes", str(BYTES), "--budgets", "64",
                    "--policies", "StreamingLLM,H2O", "--threads", "1", "--no-plots", "--out", str(cpp_dir),
                    # compare.py's protocol: full windows only, every policy at its nominal budget
                    "--drop-last", "--footing", "budget"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "examples" / "python" / "compare.py"), "--model", str(hf_model_dir),
                    "--text", str(models["text"]), "--bytes", str(BYTES), "--budgets", "64",
                    "--policies", "streaming,h2o", "--out", str(py_dir)] + ([] if plots else ["--no-plots"]),
                   check=True, capture_output=True)
    for plot in ["ppl_ratio", "long_range_recall", "top1_agreement"] if plots else []:
        assert (py_dir / f"{plot}.png").stat().st_size > 10000
    with open(cpp_dir / "results.csv") as f:  # '#' lines: the run's metadata
        cpp = {(r["protocol"], r["configuration"]): r for r in csv.DictReader(line for line in f if not line.startswith("#"))}
    py = {(r["protocol"], r["policy"]): r for r in csv.DictReader(open(py_dir / "results.csv"))}
    names = {"Full": "full", "StreamingLLM": "streaming", "H2O": "h2o"}
    for (protocol, cpp_name), c in cpp.items():
        p = py[(protocol, names[cpp_name])]
        for col in ["perplexity", "ppl_ratio"]:  # the C++ CSV prints 4 decimals
            assert abs(float(p[col]) - float(c[col])) <= max(REL_TOL * float(c[col]), 0.5e-4 + 1e-9), (protocol, cpp_name, col)
        for col in ["top1_agreement", "long_range_recall"]:
            assert abs(float(p[col]) - float(c[col])) <= 0.5e-4 + 1e-9, (protocol, cpp_name, col)
        assert round(float(p["kv_bytes"])) == int(c["kv_bytes"]), (protocol, cpp_name)
        assert p["evaluated_tokens"] == c["evaluated_tokens"] and p["recall_positions"] == c["recall_positions"]
