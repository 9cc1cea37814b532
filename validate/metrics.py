"""What validate measures: perplexity, per-token KL(source || converted), top-1 agreement, greedy
divergence and the per-layer attention error.

The two models never need to be in memory together: the source's side of every comparison is a
`Reference` (its log-probabilities, whole or top-k) kept on disk, and the converted model is scored
against it afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.deepseek import LATENT_NORM_EPS, MLAShape, attention_names
from mlakit.core.forward import MLAWeights, mla_attention, rms_norm, rope_tables
from mlakit.core.metrics import rest_log_prob, top_k_kl
from mlakit.core.stream import LayerStream, Rows, SourceModel

# Source log-probs kept per token when the whole vocabulary would take more than FULL_VOCAB_BYTES.
TOP_K = 1024
FULL_VOCAB_BYTES = 2**30
EVAL = "eval"  # the layer stream's one row set: the evaluation windows


@dataclass
class Reference:
    """The source's side of one batch: log-probs of the next token, its argmax, and its
    distribution: whole (`ids` None), or its top-k over `ids` plus the log of the mass left out."""

    target_lp: torch.Tensor
    top1: torch.Tensor
    lp: torch.Tensor
    ids: torch.Tensor | None = None
    rest_lp: torch.Tensor | None = None


def keep_top_k(n_tokens: int, vocab: int) -> int | None:
    """None (keep the whole distribution, so KL is exact) when it fits the budget, else TOP_K."""
    return None if n_tokens * vocab * 4 <= FULL_VOCAB_BYTES or vocab <= TOP_K else TOP_K


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs at every position that has a next token."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def reference(logits: torch.Tensor, windows: torch.Tensor, top_k: int | None) -> Reference:
    """The source's side of one batch, small enough to keep on disk until the converted model runs."""
    lp = _log_probs(logits)
    target_lp = lp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    if top_k is None:
        return Reference(target_lp, lp.argmax(-1), lp, None)
    top_lp, top_ids = lp.topk(top_k, dim=-1)
    return Reference(target_lp, top_ids[..., 0], top_lp, top_ids, rest_log_prob(lp, top_ids))


@dataclass
class TokenScores:
    """Per-token numbers of one batch, flattened."""

    source_nll: torch.Tensor
    converted_nll: torch.Tensor
    kl: torch.Tensor
    agree: torch.Tensor


def compare(ref: Reference, logits: torch.Tensor, windows: torch.Tensor) -> TokenScores:
    """Score the converted model's logits against the source's reference on the same windows.

    With a top-k reference the source's remaining mass is one bucket: the KL of the coarsened
    distributions, a lower bound of the full KL that is exact when nothing is left out."""
    lq = _log_probs(logits)
    lp = ref.lp.double()
    if ref.ids is None:
        kl = (lp.exp() * (lp - lq.double())).sum(-1)
    else:
        kl = top_k_kl(lp, ref.ids, ref.rest_lp, lq)
    return TokenScores(
        source_nll=-ref.target_lp.flatten().double(),
        converted_nll=-lq.gather(-1, windows[:, 1:, None]).flatten().double(),
        kl=kl.flatten().clamp_min(0),
        agree=(lq.argmax(-1) == ref.top1).flatten(),
    )


def summarize(scores: list[TokenScores], seq_len: int) -> dict:
    """Perplexities (overall and by context length), KL mean and 99th percentile, top-1 agreement over
    every scored token of windows of `seq_len`."""
    src = torch.cat([s.source_nll for s in scores])
    conv = torch.cat([s.converted_nll for s in scores])
    kl = torch.cat([s.kl for s in scores])
    agree = torch.cat([s.agree for s in scores])
    p99 = kl.sort().values[min(len(kl) - 1, math.ceil(0.99 * len(kl)) - 1)].item()
    return {
        "tokens_scored": len(kl),
        "perplexity": {"source": math.exp(src.mean().item()), "converted": math.exp(conv.mean().item())},
        "kl": {"mean": kl.mean().item(), "p99": p99, "max": kl.max().item()},
        "top1_agreement": agree.double().mean().item(),
        "by_position": by_position(src.view(-1, seq_len - 1), conv.view(-1, seq_len - 1)),
    }


# Where the loss by position is split: at these many tokens of context before the predicted one.
POSITION_EDGES = (32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Column ranges [lo, hi) of a window's seq_len - 1 predictions, split at POSITION_EDGES; column j
    predicts with j + 1 tokens of context, so a range holds contexts lo + 1 .. hi."""
    edges = [0, *(e for e in POSITION_EDGES if e < seq_len - 1), seq_len - 1]
    return list(zip(edges, edges[1:]))


def by_position(source_nll: torch.Tensor, converted_nll: torch.Tensor) -> list[dict]:
    """Both perplexities per range of context length, from (windows, seq_len - 1) token NLLs: a
    conversion calibrated on short windows may lose more on long contexts, which the overall figure hides."""
    return [{"context": [lo + 1, hi], "tokens": source_nll[:, lo:hi].numel(),
             "source": math.exp(source_nll[:, lo:hi].mean().item()),
             "converted": math.exp(converted_nll[:, lo:hi].mean().item())}
            for lo, hi in position_buckets(source_nll.shape[1] + 1)]


def greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
           new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt, stopping at EOS like a server would."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            ids = model.generate(**enc, generation_config=config)
            out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def divergence(a: list[int], b: list[int]) -> int | None:
    """The first generated token at which two greedy continuations differ, counted from 1 (1: the very
    first token differs); None when they are equal."""
    if a == b:
        return None
    return 1 + next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Rotary:
    """What a model's rotary embedding and attention use: inv_freq, cos/sin scaling, softmax scale."""

    inv_freq: torch.Tensor
    scaling: float
    softmax_scale: float

    @classmethod
    def of(cls, model: PreTrainedModel) -> Rotary:
        emb = model.model.rotary_emb
        attn = model.model.layers[0].self_attn
        return cls(emb.inv_freq.detach().float().cpu(), float(emb.attention_scaling), float(attn.scaling))

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(device) for t in rope_tables(self.inv_freq, seq_len, self.scaling))


def attention_errors(source: SourceModel, windows: torch.Tensor, converted: CheckpointReader, shape: MLAShape,
                     rms_eps: float, conv_rope: Rotary) -> list[float]:
    """Relative error ||a_conv - a_src|| / ||a_src|| of each layer's attention block (its input norm
    included) on the windows, both fed the source's hidden states, carried by the layer stream in
    float32."""
    spec = source.spec
    stream = LayerStream(source, {EVAL: Rows(windows)}, max(spec.intermediate, spec.hidden))
    cos, sin = conv_rope.tables(windows.shape[1], source.device)
    errors = []
    with torch.inference_mode():
        for step in stream:
            names = attention_names(step.index)
            get = lambda name: converted.get(name).float().to(source.device)  # noqa: E731
            w = MLAWeights(*(get(names[key]) for key in
                             ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")))
            gamma = get(f"model.layers.{step.index}.input_layernorm.weight")
            err = energy = 0.0
            for c in stream.chunks(EVAL):
                ref = step.target(EVAL)[c]
                out = mla_attention(rms_norm(step.inputs(EVAL)[c], gamma, rms_eps), w, shape.heads, shape.qk_nope,
                                    shape.qk_rope, shape.v_head, cos, sin, norm_eps=LATENT_NORM_EPS,
                                    scale=conv_rope.softmax_scale)
                err += (out - ref).pow(2).sum().item()
                energy += ref.pow(2).sum().item()
            errors.append(math.sqrt(err / max(energy, 1e-300)))
            step.advance()
    return errors
