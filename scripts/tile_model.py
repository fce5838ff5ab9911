"""Expected speed of this project's GEMM kernels relative to cuBLAS, from a roofline and tile-count
model, until a GPU run replaces it with measurements (docs/kernels.md, "Expected fraction of cuBLAS").

    python scripts/tile_model.py            # the markdown table docs/kernels.md cites
    python scripts/tile_model.py --json     # the same rows as JSON

The model, per GEMM C (M×N) = A (M×K)·B (K×N) in bf16 on one H200 (H100 SXM die: 132 SMs):
- tiles = ⌈M/BM⌉·⌈N/BN⌉ programs, `ctas` resident per SM, so waves = ⌈tiles / (132·ctas)⌉; every
  wave costs as much as a full one (wave quantization), and a partial tile as much as a whole one;
- compute time = waves · ctas · 2·BM·BN·K / (per-SM throughput), the throughput being the bf16 dense
  peak (989 TFLOPS with wgmma) × the MMA path's ceiling (`MMA_CEILING`: mma.sync issues about two
  thirds of wgmma's rate on Hopper) × the kernel's efficiency within it (`EFFICIENCY`);
- memory time = the bytes every kernel must move at least (A, B read once, C written once, C read
  once more for a residual) / (4.8 TB/s × `DRAM_EFFICIENCY`), and the tile stream each program
  reads, (BM + BN)·K·2 bytes, / the L2 bandwidth (`L2_TBPS`): a tile of arithmetic intensity
  BM·BN/(BM + BN) flop/B below the machine balance (989/4.8 = 206 flop/B) would be DRAM-bound if
  its re-reads missed L2, so the grouped launch order (GROUP_M) matters;
- a reduction over T with a small output (CERSA's dS) is split over programs as the launchers do
  (`triton.gemm.reduction_split`, `ds_splits` in csrc/lowrank.cu), its fp32 partials written and
  read once more;
- time = max(compute, memory); the Triton autotuner is modelled as choosing the fastest config the
  pruning keeps (`triton.gemm._prune_configs`). cuBLAS is modelled as ideal: its work padded to
  128×128 tiles, spread over every SM without wave quantization (persistent, stream-K), at its
  efficiency: an upper bound on cuBLAS, so the fractions err low.
The efficiencies are assumptions stated here, not measurements: the fractions are only as good as
they are, which is why the GPU check's bench stage (scripts/gpu_check.py bench) replaces them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMS = 132
PEAK_TFLOPS = 989.0  # bf16 dense, wgmma (H100/H200 SXM)
DRAM_TBPS = 4.8  # H200 HBM3e
DRAM_EFFICIENCY = 0.85  # fraction of the DRAM bandwidth a streaming kernel reaches (assumed, every kernel)
L2_TBPS = 10.0  # L2 -> SM bandwidth (assumed)
# The ceiling of each MMA path, relative to the wgmma peak (assumed: mma.sync on Hopper).
MMA_CEILING = {"wgmma": 1.0, "mma.sync": 0.66}
# Each kernel's efficiency within its ceiling on a full wave of large tiles (assumed).
EFFICIENCY = {
    "cublas": 0.80,  # TMA, warp-specialised persistent kernels
    "triton": 0.70,  # cp.async/TMA pipelines, wgmma, no warp specialisation, not persistent
    "cuda": 0.55,  # WMMA from padded shared memory (no ldmatrix swizzle), 1 block of 8 warps per SM
}


def tile(bm, bn, bk, ctas, mma):
    return dict(bm=bm, bn=bn, bk=bk, ctas=ctas, mma=mma)


# The Triton configs (BLOCK_M, BLOCK_N, BLOCK_K) with how many programs fit one SM of 227 KB and
# 64 K registers: shared memory from `pipeline_shared_bytes` (exact on sm_90), at most 128 registers
# per thread (the compiled 16-bit tiles use 100–128 on sm_90; 128×256: 202–247, so 1), by group.
TRITON_BASE = [tile(128, 64, 32, 2, "wgmma"), tile(64, 128, 64, 2, "wgmma"), tile(64, 128, 32, 2, "wgmma"),
               tile(64, 64, 64, 2, "wgmma"), tile(64, 64, 32, 4, "wgmma"), tile(32, 64, 64, 4, "mma.sync")]
TRITON_LARGE = [tile(128, 256, 64, 1, "wgmma"), tile(128, 128, 64, 1, "wgmma"), tile(128, 128, 64, 2, "wgmma")]
# csrc/lowrank.cu before (64×64, 4 warps, scalar loads, no pipeline) and now (128×128, cp.async).
CUDA_BEFORE = tile(64, 64, 32, 4, "mma.sync")
CUDA_NOW = tile(128, 128, 32, 1, "mma.sync")
CUDA_BEFORE_EFFICIENCY = 0.25  # every operand element a 2-byte load through registers, one stage


def _dram(M, N, K, residual, split=1):
    partials = 2 * split * M * N * 4 if split > 1 else 0  # fp32 slices written, then read by the sum
    return (2 * (M * K + K * N + M * N * (2 if residual else 1)) + partials) / (DRAM_TBPS * 1e12 * DRAM_EFFICIENCY)


def gemm_time(M, N, K, t, efficiency, residual=False, split=1):
    """Seconds of one GEMM on tile t (the model of the module docstring) and what bounds it."""
    k_per = math.ceil(K / split)
    tiles = math.ceil(M / t["bm"]) * math.ceil(N / t["bn"]) * split
    slots = SMS * t["ctas"]
    waves = math.ceil(tiles / slots)
    per_sm = PEAK_TFLOPS * 1e12 * MMA_CEILING[t["mma"]] * efficiency / SMS
    compute = waves * t["ctas"] * 2 * t["bm"] * t["bn"] * k_per / per_sm
    dram = _dram(M, N, K, residual, split)
    l2 = tiles * (t["bm"] + t["bn"]) * k_per * 2 / (L2_TBPS * 1e12)
    bound = max((compute, "compute"), (dram, "DRAM"), (l2, "L2"))
    return dict(seconds=bound[0], bound=bound[1], tiles=tiles, waves=waves, wave_fill=tiles / (waves * slots),
                intensity=t["bm"] * t["bn"] / (t["bm"] + t["bn"]))


def best(M, N, K, configs, efficiency, residual=False, split=1):
    runs = [(gemm_time(M, N, K, t, efficiency, residual, split), t) for t in configs]
    return min(runs, key=lambda r: r[0]["seconds"])


def cublas_time(M, N, K, residual=False):
    """The ideal cuBLAS of the module docstring: padded work over every SM, no wave quantization."""
    work = 2 * math.ceil(M / 128) * 128 * math.ceil(N / 128) * 128 * K
    compute = work / (PEAK_TFLOPS * 1e12 * EFFICIENCY["cublas"])
    dram = _dram(M, N, K, residual)
    return dict(seconds=max(compute, dram), bound="compute" if compute >= dram else "DRAM")


def triton_split(M, N, K):
    """`triton.gemm.reduction_split` on an H200 for a reduction over K = T."""
    tiles = math.ceil(M / 64) * math.ceil(N / 64)
    return max(1, min(max(1, 2 * SMS // tiles), math.ceil(K / 256)))


def cuda_split(M, N, K):
    """`ds_splits` of csrc/lowrank.cu (16-bit tiles) on an H200."""
    tiles = math.ceil(M / CUDA_NOW["bm"]) * math.ceil(N / CUDA_NOW["bn"])
    return max(1, min(2 * SMS // tiles, math.ceil(K / 256)))


def _aligned(*sizes):
    return all(s % 16 == 0 for s in sizes)


def triton_configs(M, N, K):
    """What `_prune_configs` keeps for an aligned dense bf16 launch on sm_90."""
    large = [t for t in TRITON_LARGE if _aligned(M, N, K) and _bucket(M) >= t["bm"] and _bucket(N) >= t["bn"]]
    return TRITON_BASE + large


def _bucket(n):
    return 1 << max(0, (n - 1).bit_length())


def shapes(d=4096):
    """(name, M, N, K, residual, split reduction) of the GEMMs of one layer at d = 4096: the dense base
    projection, CERSA's (k = 256, 1024), LoRA's rank-16 update."""
    out = []
    for T in (4096, 8192):
        out.append((f"x·W0ᵀ base projection, T={T}", T, d, d, False, False))
        for k in (256, 1024):
            out += [(f"CERSA h = x·V, T={T}, k={k}", T, k, d, False, False),
                    (f"CERSA y = h·(US)ᵀ, T={T}, k={k}", T, d, k, False, False),
                    (f"CERSA dS = gᵀ·h, T={T}, k={k}", k, k, T, False, True)]
        out.append((f"LoRA y += xa·(sB)ᵀ, T={T}, r=16", T, d, 16, True, False))
    return out


def rows():
    table = []
    for name, M, N, K, residual, splits in shapes():
        cub = cublas_time(M, N, K, residual)
        ts = triton_split(M, N, K) if splits else 1
        # the split reduction's output is fp32 partials: the large tiles (16-bit, dense) still apply
        tri_before, tb = best(M, N, K, TRITON_BASE, EFFICIENCY["triton"], residual, ts)
        tri_now, tn = best(M, N, K, triton_configs(M, N, K), EFFICIENCY["triton"], residual, ts)
        cs = cuda_split(M, N, K) if splits else 1
        cuda_before = gemm_time(M, N, K, CUDA_BEFORE, CUDA_BEFORE_EFFICIENCY, residual, cs)
        cuda_now = gemm_time(M, N, K, CUDA_NOW, EFFICIENCY["cuda"], residual, cs)
        table.append(dict(
            gemm=name, M=M, N=N, K=K, cublas_us=round(cub["seconds"] * 1e6, 1), cublas_bound=cub["bound"],
            triton_before=round(cub["seconds"] / tri_before["seconds"], 2),
            triton_now=round(cub["seconds"] / tri_now["seconds"], 2),
            triton_tile=f"{tn['bm']}×{tn['bn']}×{tn['bk']}", triton_bound=tri_now["bound"],
            triton_wave_fill=round(tri_now["wave_fill"], 2),
            cuda_before=round(cub["seconds"] / cuda_before["seconds"], 2),
            cuda_now=round(cub["seconds"] / cuda_now["seconds"], 2), cuda_bound=cuda_now["bound"],
            cuda_wave_fill=round(cuda_now["wave_fill"], 2),
        ))
    return table


def markdown(table) -> str:
    head = ("| GEMM (M×N×K) | cuBLAS model | Triton before | Triton now (tile, bound, wave fill) "
            "| CUDA before | CUDA now (bound, wave fill) |\n|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['gemm']} ({r['M']}×{r['N']}×{r['K']}) | {r['cublas_us']} µs, {r['cublas_bound']} | {r['triton_before']:.2f} "
        f"| {r['triton_now']:.2f} ({r['triton_tile']}, {r['triton_bound']}, {r['triton_wave_fill']:.2f}) "
        f"| {r['cuda_before']:.2f} | {r['cuda_now']:.2f} ({r['cuda_bound']}, {r['cuda_wave_fill']:.2f}) |\n"
        for r in table)
    return head + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    table = rows()
    sys.stdout.write(json.dumps(table, indent=1) + "\n" if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
