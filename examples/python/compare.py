#!/usr/bin/env python3
"""compare.py: how kvtrim policies trade KV memory for quality on a Hugging Face causal LM (the Python
counterpart of examples/compare_policies.cpp, with the same protocols and metrics).

    python examples/python/compare.py --model DIR --text FILE [--budgets 32,64] [--policies streaming,h2o]

DIR is any local Hugging Face Llama-family model directory (config, weights, tokenizer), e.g. one written by
``python -m kvtrim.llama2c stories260K.bin tok512.bin DIR``. The text's first --bytes bytes (never cut inside a
UTF-8 character) are tokenised without special tokens and cut into windows of BOS + --window - 1 tokens. Each
window goes teacher-forced through the model with a kvtrim cache, in two protocols:
  stream  every token decoded through the cache (one forward per window, decoded token by token in kvtrim);
  prompt  the first --prompt tokens prefilled and compressed by the policy, the rest decoded.
Per (policy, budget, protocol): perplexity and its ratio to the full cache, top-1 agreement with the full cache,
mean KL(full || policy), long-range recall (targets whose closest earlier occurrence is >= --recall-distance back
and which the full cache predicts; the fraction the policy still predicts), KV bytes in use (the most seen after
a forward call, per window, averaged; % of the full cache's) and tokens/s. Policies that never evict (full,
eigen+full, snapkv) run once, with a budget that holds the window. Output: a table, results.csv and
PNG plots (matplotlib) in --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import numpy as np
import torch

import kvtrim
import kvtrim.hf

DEFAULT_POLICIES = ["streaming", "h2o", "tova", "l2norm", "hashevict", "snapkv+h2o", "buzz", "buzz-hash", "ems",
                    "eigen+full", "eigen+h2o"]


def read_text(path: str, offset: int, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        b = f.read(size)
    start = 0
    while start < len(b) and (b[start] & 0xC0) == 0x80:  # never start or end inside a UTF-8 character
        start += 1
    end = len(b)
    while end > start and (b[end - 1] & 0xC0) == 0x80:
        end -= 1
    if end > start and b[end - 1] & 0x80:
        end -= 1
    return b[start:end].decode("utf-8", errors="replace")


def make_windows(ids: list[int], window: int, bos: int) -> list[list[int]]:
    w = window - 1
    return [[bos] + ids[i:i + w] for i in range(0, len(ids) - w + 1, w)]


class Runner:
    def __init__(self, model, args):
        self.model, self.args = model, args
        self.cache_kw = kvtrim.hf.cache_argument(model)

    def first_eval(self, protocol: str, L: int) -> int:
        return 0 if protocol == "stream" else min(self.args.prompt, L - 2)

    def logits(self, window: list[int], protocol: str, policy: str, budget: int, params: dict, basis=None,
               tap=None):
        """Logits [L-1-first, vocab] of the evaluated positions, peak KV bytes, seconds."""
        L = len(window)
        ids = torch.tensor([window])
        cache = kvtrim.hf.KVTrimCache(self.model, policy, budget=budget, params=params, basis=basis, tap=tap,
                                      prompt="stream" if protocol == "stream" else "compress")
        first = self.first_eval(protocol, L)
        t0 = time.perf_counter()
        peak = 0
        with torch.no_grad():
            if first > 0:
                self.model(ids[:, :first], **{self.cache_kw: cache}, use_cache=True)
                peak = cache.bytes_used
            out = self.model(ids[:, first:L - 1], **{self.cache_kw: cache}, use_cache=True).logits[0]
        peak = max(peak, cache.bytes_used)
        return out.double(), peak, time.perf_counter() - t0


def long_range(window: list[int], p: int, distance: int) -> bool:
    for j in range(p - 1, 0, -1):  # BOS (position 0) excluded
        if window[j] == window[p]:
            return p - j >= distance
    return False


def calibrate(runner: Runner, windows: list[list[int]], energy: float, cfg):
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    cal = kvtrim.EigenCalibrator(n_layers=cfg.num_hidden_layers, n_kv_heads=n_kv, n_q_heads=n_q, head_dim=d)
    for w in windows:  # the whole window in one prefill, every token's rotated q, k, v
        cache = kvtrim.hf.KVTrimCache(runner.model, "full", budget=len(w), tap=lambda l, q, k, v: cal.add(l, k, v, q))
        with torch.no_grad():
            runner.model(torch.tensor([w]), **{runner.cache_kw: cache}, use_cache=True)
    return cal.basis(energy=energy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    ap.add_argument("--text", required=True, help="evaluation text (UTF-8)")
    ap.add_argument("--bytes", type=int, default=100000, help="bytes of text to evaluate (default 100000)")
    ap.add_argument("--calib-bytes", type=int, default=20000, help="bytes after those for Eigen Attention's basis")
    ap.add_argument("--eigen-energy", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=512, help="tokens per window, BOS included (default 512)")
    ap.add_argument("--windows", type=int, default=0, help="at most this many windows (0: all)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens in the prompt protocol (default 256)")
    ap.add_argument("--budgets", default="32,64,128,256", help="tokens kept per KV head")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"registered kvtrim policies (kvtrim.policies(): {', '.join(kvtrim.policies())})")
    ap.add_argument("--param", action="append", default=[], metavar="POLICY.KEY=VALUE",
                    help="a policy parameter, e.g. h2o.heavy_ratio=0.25 (repeatable)")
    ap.add_argument("--protocols", default="stream,prompt")
    ap.add_argument("--recall-distance", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default="out/compare-python")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    protocols = [p for p in args.protocols.split(",") if p]
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in kvtrim.policies():
            ap.error(f"--policies: {p!r} is not registered; registered: {', '.join(kvtrim.policies())}")
    params: dict[str, dict[str, str]] = {}
    for item in args.param:
        name, _, kv = item.partition(".")
        key, eq, value = kv.partition("=")
        if not eq or name not in kvtrim.policies():
            ap.error(f"--param {item!r}: expected POLICY.KEY=VALUE with a registered policy")
        params.setdefault(name, {})[key] = value

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=kvtrim.hf.ATTN_IMPLEMENTATION,
                                                 dtype=torch.float32).eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    if args.window > model.config.max_position_embeddings:
        ap.error(f"--window {args.window} exceeds the model's context ({model.config.max_position_embeddings})")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    windows = make_windows(encode(read_text(args.text, 0, args.bytes)), args.window, bos)
    if args.windows:
        windows = windows[:args.windows]
    if not windows:
        ap.error(f"the first {args.bytes} bytes of {args.text} give less than one window of {args.window} tokens")
    runner = Runner(model, args)
    basis = None
    if any(kvtrim.needs_basis(p) for p in policies):
        calib = make_windows(encode(read_text(args.text, args.bytes, args.calib_bytes)), args.window, bos)
        if calib:
            basis = calibrate(runner, calib, args.eigen_energy, model.config)
        else:
            print("compare.py: no text after the evaluated bytes for Eigen Attention's basis; eigen+* skipped")
            policies = [p for p in policies if not kvtrim.needs_basis(p)]
    print(f"compare.py: {args.model}, {len(windows)} windows of {args.window} tokens, {len(policies)} policies x "
          f"{len(budgets)} budgets x {len(protocols)} protocols", flush=True)

    rows = []
    for protocol in protocols:
        acc = {}  # (policy, budget) -> sums
        def add(key, **kw):
            a = acc.setdefault(key, dict(nll=0.0, kl=0.0, n=0, agree=0, rec_hit=0, rec_n=0, bytes=0.0, sec=0.0,
                                         tokens=0, windows=0, error=""))
            for k, v in kw.items():
                a[k] = a[k] + v if k != "error" else (a[k] or v)
        for w in windows:
            L = len(w)
            first = runner.first_eval(protocol, L)
            targets = torch.tensor(w[first + 1:L])
            full, peak, sec = runner.logits(w, protocol, "full", L, {})
            ref_lp = torch.log_softmax(full, -1)
            ref_top = full.argmax(-1)
            lr = torch.tensor([long_range(w, t + 1, args.recall_distance) for t in range(first, L - 1)])
            lr &= ref_top == targets
            nll = -ref_lp[torch.arange(len(targets)), targets].sum().item()
            add(("full", L), nll=nll, n=len(targets), agree=len(targets), rec_hit=int(lr.sum()), rec_n=int(lr.sum()),
                bytes=peak, sec=sec, tokens=L - 1, windows=1)
            for policy in policies:
                for budget in ([L] if kvtrim.never_evicts(policy) else budgets):
                    try:
                        logits, peak, sec = runner.logits(w, protocol, policy, budget, params.get(policy, {}), basis)
                    except kvtrim.Error as e:
                        add((policy, budget), error=str(e))
                        continue
                    lp = torch.log_softmax(logits, -1)
                    top = logits.argmax(-1)
                    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).sum().item()
                    add((policy, budget), nll=-lp[torch.arange(len(targets)), targets].sum().item(), kl=kl,
                        n=len(targets), agree=int((top == ref_top).sum()), rec_hit=int((lr & (top == targets)).sum()),
                        rec_n=int(lr.sum()), bytes=peak, sec=sec, tokens=L - 1, windows=1)
        full_key = next(k for k in acc if k[0] == "full")
        full = acc[full_key]
        full_ppl = math.exp(full["nll"] / max(1, full["n"]))
        print(f"\n{protocol} protocol ({len(windows)} windows; full-cache perplexity {full_ppl:.3f} over {full['n']} "
              f"tokens, {full['rec_n']} long-range positions)")
        print(f"{'policy':<12} {'budget':>6} {'KV bytes':>10} {'% full':>7} {'ppl':>9} {'x full':>8} {'top-1':>7} "
              f"{'KL':>8} {'recall':>7} {'tok/s':>8}")
        for (policy, budget), a in acc.items():
            row = dict(protocol=protocol, policy=policy, budget=budget, error=a["error"])
            if not a["error"]:
                ppl = math.exp(a["nll"] / max(1, a["n"]))
                row.update(kv_bytes=a["bytes"] / max(1, a["windows"]), kv_pct_of_full=100 * a["bytes"] / max(1, full["bytes"]),
                           perplexity=ppl, ppl_ratio=ppl / full_ppl, top1_agreement=a["agree"] / max(1, a["n"]),
                           mean_kl=a["kl"] / max(1, a["n"]), long_range_recall=a["rec_hit"] / a["rec_n"] if a["rec_n"] else 1.0,
                           recall_positions=a["rec_n"], evaluated_tokens=a["n"], tokens_per_s=a["tokens"] / max(a["sec"], 1e-9))
                print(f"{policy:<12} {budget:>6} {row['kv_bytes']:>10.0f} {row['kv_pct_of_full']:>6.1f}% {ppl:>9.4f} "
                      f"{row['ppl_ratio']:>8.4f} {100 * row['top1_agreement']:>6.1f}% {row['mean_kl']:>8.4f} "
                      f"{100 * row['long_range_recall']:>6.1f}% {row['tokens_per_s']:>8.0f}")
            else:
                print(f"{policy:<12} {budget:>6}  n/a: {a['error']}")
            rows.append(row)

    os.makedirs(args.out, exist_ok=True)
    fields = ["protocol", "policy", "budget", "kv_bytes", "kv_pct_of_full", "perplexity", "ppl_ratio", "top1_agreement",
              "mean_kl", "long_range_recall", "recall_positions", "evaluated_tokens", "tokens_per_s", "error"]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"\nresults: {args.out}/results.csv")
    if not args.no_plots:
        plot(rows, args.out)
    return 0


def plot(rows, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    protocols = sorted({r["protocol"] for r in rows})
    for metric, label in [("ppl_ratio", "perplexity / full cache"), ("long_range_recall", "long-range recall"),
                          ("top1_agreement", "top-1 agreement with full cache")]:
        fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.5), squeeze=False)
        for ax, protocol in zip(axes[0], protocols):
            for policy in dict.fromkeys(r["policy"] for r in rows if r["protocol"] == protocol and r["policy"] != "full"):
                pts = sorted((r["kv_pct_of_full"], r[metric]) for r in rows
                             if r["protocol"] == protocol and r["policy"] == policy and not r["error"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=policy)
            if metric == "ppl_ratio":
                ax.set_yscale("log")
            ax.set_xlabel("KV memory, % of the full cache")
            ax.set_ylabel(label)
            ax.set_title(f"{protocol} protocol")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{metric}.png"), dpi=110)
        plt.close(fig)
    print(f"plots: {out}/ppl_ratio.png {out}/long_range_recall.png {out}/top1_agreement.png")


if __name__ == "__main__":
    sys.exit(main())
