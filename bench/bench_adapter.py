"""Cost of the IdGlow multi-ID cross-attention on one real-width Qwen-Image dual-stream block. Prints JSON.

One ``QwenImageTransformerBlock`` (width 3072 = 24 heads x 128, zero_cond_t as in 2511, random weights) runs
on 1024 target + 2048 reference-image + 128 text tokens; the adapter adds its cross-attention to 3 identities
x 8 tokens on the 1024 target tokens. Reported: median block time with / without the adapter (ratio). The
adapter is timed right after the block in each repetition, so load from other processes hits both alike;
``time_overhead_median_of_reps`` is the median of those same-moment ratios. The ID encoder, which runs once
per DiT call, is charged 1/60 per block. Also: the analytic FLOP ratio, and the parameter counts for the
real 2511 transformer (60 blocks, built on the meta device, nothing allocated).

    python bench/bench_adapter.py                               # CPU, float32 (slow: ~10-60 s per block call)
    python bench/bench_adapter.py --device cuda --dtype bf16 --reps 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from idglow_core.adapter import AdapterConfig, IdGlowAdapter, count_parameters  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (after 1 warm-up)")
    p.add_argument("--target", type=int, default=32, help="target latent side in tokens (32 -> 1024 tokens)")
    p.add_argument("--refs", type=int, default=2, help="reference images of the same size as the target")
    p.add_argument("--text", type=int, default=128, help="text tokens")
    p.add_argument("--ids", type=int, default=3, help="identities")
    p.add_argument("--inner-dim", type=int, default=512, help="adapter attention width")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p.parse_args()


def meta_counts() -> dict[str, int]:
    """Parameter counts of the real 2511 DiT and of the adapter for it, on the meta device."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        dit = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                          guidance_embeds=False, axes_dims_rope=(16, 56, 56), zero_cond_t=True)
        adapter = IdGlowAdapter.init_for(dit)
    return {"dit_params": sum(p.numel() for p in dit.parameters()),
            "dit_block_params": sum(p.numel() for p in dit.transformer_blocks[0].parameters()),
            "adapter_params": sum(p.numel() for p in adapter.parameters()),
            "adapter_params_analytic": count_parameters(adapter.config)}


def flop_ratio(n_tgt: int, n_img: int, n_txt: int, dim: int, cfg: AdapterConfig, n_tok: int) -> float:
    """Multiply-adds of the adapter over those of the block (linear layers + attention scores/values)."""
    seq = n_img + n_txt
    block = seq * 12 * dim * dim + 2 * seq * seq * dim            # qkv+out (4 d^2) + MLP (8 d^2); QK^T and AV
    adapter = n_tgt * 2 * dim * cfg.inner_dim + 2 * n_tok * cfg.token_dim * cfg.inner_dim \
        + 2 * n_tgt * n_tok * cfg.inner_dim
    return adapter / block


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformerBlock

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    dim, side = 3072, args.target
    n_tgt, n_img = side * side, side * side * (1 + args.refs)
    torch.manual_seed(0)
    block = QwenImageTransformerBlock(dim, 24, 128, zero_cond_t=True).to(device, dtype).eval()
    cfg = AdapterConfig(hidden_dim=dim, num_blocks=1, inner_dim=args.inner_dim)
    adapter = IdGlowAdapter(cfg).to(device, dtype).eval()
    with torch.no_grad():  # a "trained" adapter: non-zero output (a fresh one adds exact zeros)
        adapter.blocks[0].to_out.weight.normal_(std=0.02)
    shapes = [[(1, side, side)] * (1 + args.refs)]
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)(shapes, device, max_txt_seq_len=args.text)
    img = torch.randn(1, n_img, dim, device=device, dtype=dtype)
    txt = torch.randn(1, args.text, dim, device=device, dtype=dtype)
    temb = torch.randn(2, dim, device=device, dtype=dtype)  # zero_cond_t: [t, 0] rows
    mod_index = torch.tensor([[0] * n_tgt + [1] * (n_img - n_tgt)], device=device, dtype=torch.int)
    emb = torch.nn.functional.normalize(torch.randn(1, args.ids, 512, device=device, dtype=dtype), dim=-1)
    scale = torch.ones(1, device=device)

    def timed(fn) -> tuple[float, object]:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    def one_rep() -> tuple[float, float, float]:
        """Seconds for the block, for the adapter after it (residual + add), and for the ID encoder."""
        t_block, (_, h) = timed(lambda: block(hidden_states=img, encoder_hidden_states=txt,
                                              encoder_hidden_states_mask=None, temb=temb,
                                              image_rotary_emb=rope, modulate_index=mod_index))
        t_enc, (tokens, mask) = timed(lambda: adapter.encode(emb))
        t_res, _ = timed(lambda: torch.cat([h[:, :n_tgt] + adapter.block_residual(0, h[:, :n_tgt], tokens, mask,
                                                                                   scale), h[:, n_tgt:]], dim=1))
        return t_block, t_res, t_enc

    with torch.inference_mode():
        one_rep()  # warm-up
        reps = [one_rep() for _ in range(args.reps)]
    t_block = statistics.median(r[0] for r in reps)
    t_res = statistics.median(r[1] for r in reps)
    t_enc = statistics.median(r[2] for r in reps)
    # The encoder runs once per DiT forward, shared by all 60 blocks: its share per block is t_enc / 60.
    with_ad = t_block + t_res + t_enc / 60
    per_rep = statistics.median((r[1] + r[2] / 60) / r[0] for r in reps)  # same-moment ratios: robust to load
    best = (min(r[1] for r in reps) + min(r[2] for r in reps) / 60) / min(r[0] for r in reps)
    counts = meta_counts()
    print(json.dumps({
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "reps": args.reps,
        "tokens": {"target": n_tgt, "reference": n_img - n_tgt, "text": args.text, "id": args.ids * cfg.tokens_per_id},
        "adapter_config": {"inner_dim": cfg.inner_dim, "head_dim": cfg.head_dim, "token_dim": cfg.token_dim},
        "block_s_median": round(t_block, 4), "adapter_residual_s_median": round(t_res, 4),
        "id_encoder_s_median": round(t_enc, 4), "block_with_adapter_s": round(with_ad, 4),
        "time_ratio_with_vs_without": round(with_ad / t_block, 4), "time_overhead": round(with_ad / t_block - 1, 4),
        "time_overhead_median_of_reps": round(per_rep, 4), "time_overhead_min_times": round(best, 4),
        "times_s": [[round(v, 4) for v in r] for r in reps],
        "flop_overhead_analytic": round(flop_ratio(n_tgt, n_img, args.text, dim, cfg, args.ids * 8), 5),
        **counts, "adapter_fraction_of_dit": round(counts["adapter_params"] / counts["dit_params"], 5),
    }, indent=1))


if __name__ == "__main__":
    main()
