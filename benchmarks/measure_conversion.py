"""Conversion at scale (CPU): wall time and peak RSS rise of `decompose` and of `apply(model, "cersa")`.

Each case runs in its own subprocess (so one case's high-water mark cannot leak into another's): it
builds its input, resets the kernel's RSS high-water mark (`/proc/self/clear_refs`, Linux), runs
once and prints one JSON line: seconds, peak RSS rise above the RSS before the call, the weight's
bytes. The code measured is the `cersa_kernels` on PYTHONPATH, so an older checkout is measured by
pointing `--root` at it (e.g. a worktree of main).

    OMP_NUM_THREADS=1 python benchmarks/measure_conversion.py --case decompose:4096x4096:decaying:default --root .
    OMP_NUM_THREADS=1 python benchmarks/measure_conversion.py --all --old-root ../main > rows.jsonl

Spectra: "decaying", W = G₁ diag(i^-0.75) G₂ᵀ / √min(m, n) with Gaussian G₁, G₂ (a trained
layer's spectrum decays; energy 0.95 then needs k ≪ d/4); "gaussian", a random-init weight (flat
spectrum: energy 0.95 needs k ≈ 0.7 d, beyond a sketch, so the exact SVD runs).
Timings on a shared CPU are noisy; speed claims belong in the pytest-benchmark rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _reset_high_water() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def synthetic_weight(m: int, n: int, spectrum: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if spectrum == "gaussian":
        return torch.randn(m, n, generator=g) / n**0.5
    r = min(m, n)
    scale = torch.arange(1, r + 1, dtype=torch.float32) ** -0.75
    left = torch.randn(m, r, generator=g) * scale
    return left @ torch.randn(n, r, generator=g).T / r**0.5


def llama(spectrum: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=2048)
    model = LlamaForCausalLM(config).float()
    if spectrum == "decaying":
        with torch.no_grad():  # every Linear of the decoder (lm_head too) gets a decaying spectrum
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            for i, module in enumerate(linears):
                module.weight.copy_(synthetic_weight(*module.weight.shape, "decaying", i))
    return model


def run_case(case: str) -> dict:
    import torch

    torch.set_num_threads(1)
    kind, rest = case.split(":", 1)
    if kind == "decompose":
        shape, spectrum, how = rest.split(":")
        m, n = map(int, shape.split("x"))
        w = synthetic_weight(m, n, spectrum, 0)
        before = _reset_high_water()
        start = time.perf_counter()
        if how == "svd_lowrank":  # the anchor: torch's randomized SVD at k = d/4, niter=2
            U, S, V = torch.svd_lowrank(w, q=min(m, n) // 4, niter=2)
            k = S.numel()
        else:
            from cersa_kernels import decompose

            k = decompose(w, 0.95).rank if how == "default" else decompose(w, rank=min(m, n) // 4).rank
        seconds = time.perf_counter() - start
        weight_bytes = w.numel() * w.element_size()
    else:
        spectrum = rest
        model = llama(spectrum)
        import cersa_kernels as ck

        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        before = _reset_high_water()
        start = time.perf_counter()
        report = ck.apply(model, "cersa")
        seconds = time.perf_counter() - start
        k = sorted({r["rank"] for r in report.rows})
    peak = _status("VmHWM") - before
    return dict(case=case, seconds=round(seconds, 2), peak_rss_rise_bytes=peak, weight_bytes=weight_bytes,
                peak_over_weight=round(peak / weight_bytes, 3), k=k if isinstance(k, int) else k[:6])


CASES = [
    "decompose:4096x4096:decaying:default", "decompose:11008x4096:decaying:default",
    "decompose:4096x4096:decaying:svd_lowrank", "decompose:11008x4096:decaying:svd_lowrank",
    "decompose:4096x4096:decaying:rank_d4", "decompose:11008x4096:decaying:rank_d4",
    "decompose:4096x4096:gaussian:default",
    "apply:gaussian", "apply:decaying",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--root", default=".")
    parser.add_argument("--old-root", help="a checkout of the code before this change (measured as 'old')")
    parser.add_argument("--only", help="run only the cases containing this text")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    roots = [("new", args.root)] + ([("old", args.old_root)] if args.old_root else [])
    for case in CASES:
        if args.only and args.only not in case:
            continue
        for label, root in roots:
            if label == "old" and case.endswith("svd_lowrank"):
                continue  # the anchor is torch's, the same in both
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.abspath(root))
            out = subprocess.run([sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else json.dumps(
                dict(case=case, error=out.stderr.strip().splitlines()[-1:]))
            record = json.loads(line)
            record["code"] = label
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
