"""How much of each layer's key energy is the keys' mean over tokens, which softmax removes.

For every layer: ||K mu||^2 / E||K x||^2 for the keys and values (k_proj, v_proj, biases
included), and for the keys weighted as the joint latent weights them, by E[q q^T] of each kv
head's query heads. Inputs are the layers' normed inputs on --tokens tokens of --text in
windows of 512. RoPE is left out (the mean of the rotary dims turns with position).

    python benchmarks/bench_key_mean.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct --text demo/docstrings.txt
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with open(args.text, encoding="utf-8") as fh:
        ids = tok(fh.read(), return_tensors="pt")["input_ids"][0]
    ids = ids[: args.tokens // 512 * 512].view(-1, 512)
    moments: dict[int, list] = {}

    def hook(i: int):
        def record(_module, inputs) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            m = moments.setdefault(i, [0.0, 0.0, 0])
            m[0], m[1], m[2] = m[0] + x.T @ x, m[1] + x.sum(0), m[2] + x.shape[0]
        return record

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_pre_hook(hook(i))
    with torch.no_grad():
        model(ids)
    cfg = model.config
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    print("| layer | key mean share | key mean share, query-weighted | value mean share |")
    print("|---:|---:|---:|---:|")
    for i, layer in enumerate(model.model.layers):
        xx, xs, n = moments[i]
        sigma, mu = xx / n, xs / n
        shares = []
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.double()
            b = proj.bias.double() if proj.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            mean = w @ mu + b
            energy = torch.trace(w @ sigma @ w.T) + 2 * (w @ mu) @ b + b @ b
            shares.append((mean @ mean / energy).item())
        wq = layer.self_attn.q_proj.weight.double().view(heads, d, -1)
        wk = layer.self_attn.k_proj.weight.double().view(groups, d, -1)
        bk = (layer.self_attn.k_proj.bias.double().view(groups, d) if layer.self_attn.k_proj.bias is not None
              else torch.zeros(groups, d, dtype=torch.float64))
        num = den = 0.0
        for g in range(groups):
            metric = sum(wq[h] @ sigma @ wq[h].T for h in range(g * heads // groups, (g + 1) * heads // groups))
            mean = wk[g] @ mu + bk[g]
            second = wk[g] @ sigma @ wk[g].T + torch.outer(wk[g] @ mu, bk[g]) * 2 + torch.outer(bk[g], bk[g])
            num += (mean @ metric @ mean).item()
            den += torch.trace(metric @ second).item()
        print(f"| {i} | {shares[0]:.2f} | {num / den:.2f} | {shares[1]:.2f} |")


if __name__ == "__main__":
    main()
