#!/usr/bin/env python
"""Train the small Llama (GQA) model that mlakit bundles as its demo.

The bundled demo in ``demo/`` is a tiny ``LlamaForCausalLM`` (4 layers, hidden size 256,
4 query heads sharing 2 key-value heads, head_dim 64, tied embeddings, a 2048-entry
byte-level BPE vocabulary) trained for about 12 minutes on two CPU cores. It exists so that
the converter, the calibration and the validation code have a real, trained GQA model to
work on without any download.

Corpus
    Without ``--text`` the corpus is the Python standard library's own documentation: the
    ``inspect.getdoc`` text of the public stdlib modules and of their public classes,
    functions and class methods, in a deterministic order, deduplicated, joined by blank
    lines and capped at about 2 MB. It is bundled as ``demo/docstrings.txt`` and other code
    uses it as the default calibration and evaluation text, so it must stay stable: the
    script reads the bundled file and only rebuilds it (from the running interpreter's
    standard library) when ``--write-corpus`` is given.

    With ``--text FILE`` any UTF-8 text file is used instead.

    Convention: train on the first 90% of the characters, evaluate on the last 10%.

Tokenizer
    A byte-level BPE (``tokenizers`` library) trained on the training split only, saved as
    ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` so that
    ``transformers.AutoTokenizer.from_pretrained(out)`` loads it offline. ``<|endoftext|>``
    is the bos, eos and pad token.

Training
    AdamW, linear warmup then cosine decay, fp32 on the CPU, random windows of ``--seq-len``
    tokens from the training split, fixed seeds. The budget is ``--steps`` or, when that is
    not given, ``--minutes`` of wall time (the cosine schedule is then laid out over the step
    count that the measured throughput predicts). At the end the held-out 10% is scored in
    non-overlapping windows of ``--seq-len`` tokens (perplexity), once with the fp32 weights
    and once with the saved (by default bfloat16) checkpoint reloaded and upcast to fp32.

Output (``--out``, default ``demo/`` next to this repository's package)
    config.json, generation_config.json, model.safetensors (``--save-dtype``, bf16 by default
    to keep the bundled file to a few MB), the tokenizer files and a README.md giving the
    command that trained the model and its measured perplexity.

Examples
    # the bundled demo (run from the repository root)
    python scripts/train_demo.py --steps 700 --eval-every 100

    # rebuild the bundled corpus from this interpreter's stdlib (changes the demo's data!)
    python scripts/train_demo.py --write-corpus --corpus-only

    # a ~5M-parameter Shakespeare model somewhere else
    python scripts/train_demo.py --text shakespeare.txt --layers 6 --out /tmp/shakespeare
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "demo"
DEFAULT_CORPUS = DEFAULT_OUT / "docstrings.txt"
SPECIAL = "<|endoftext|>"
TRAIN_FRACTION = 0.9

# Stdlib modules that are not imported for the corpus: side effects on import (opening a
# browser, printing, GUI toolkits), test suites, and bundled installers/data.
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "ensurepip", "lib2to3", "pydoc_data", "__phello__", "__hello__",
    # deprecated; in a virtual environment setuptools substitutes its own copy
    "distutils",
}
SKIP_SUBMODULES = {"test", "tests", "idle_test", "__main__"}


# --------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------

def _public_names(obj) -> list[str]:
    return sorted(n for n in dir(obj) if not n.startswith("_"))


def _import_quietly(name: str):
    """Import a module with its warnings and any output on import swallowed; None if it
    cannot be imported here (platform-specific modules such as winreg or msvcrt)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:
        return None


def _stdlib_modules():
    """Public stdlib modules in a deterministic order: each top-level module of
    ``sys.stdlib_module_names`` (sorted), followed depth-first by its public submodules
    (sorted), leaving out test suites, ``__main__`` modules and ``encodings``' codec tables."""
    def walk(name):
        mod = _import_quietly(name)
        if mod is None:
            return
        yield mod
        if name == "encodings" or not hasattr(mod, "__path__"):
            return
        subs = sorted(m.name for m in pkgutil.iter_modules(mod.__path__))
        for sub in subs:
            if sub.startswith("_") or sub in SKIP_SUBMODULES:
                continue
            yield from walk(f"{name}.{sub}")

    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        yield from walk(name)


def build_stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """Docstrings of the public stdlib modules, their public classes, functions and methods.

    Modules come in the order of :func:`_stdlib_modules`, attributes and class members in
    sorted order; a docstring already seen (inherited or re-exported) or shorter than 20
    characters is left out. Stops once ``max_chars`` is reached.
    """
    seen: set[str] = set()
    docs: list[str] = []
    total = 0

    def add(obj) -> None:
        nonlocal total
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            return
        if not doc:
            return
        doc = doc.strip()
        if len(doc) < 20 or doc in seen:
            return
        seen.add(doc)
        docs.append(doc)
        total += len(doc) + 2

    def objects(mod):
        yield mod
        for name in _public_names(mod):
            try:
                obj = getattr(mod, name)
            except Exception:
                continue
            if inspect.isclass(obj):
                yield obj
                members = vars(obj)
                for mname in sorted(members):
                    if mname.startswith("_"):
                        continue
                    member = members[mname]
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isroutine(member) or isinstance(member, property):
                        yield member
            elif inspect.isroutine(obj):
                yield obj

    for mod in _stdlib_modules():
        for obj in objects(mod):
            add(obj)
            if total >= max_chars:
                return "\n\n".join(docs) + "\n"
    return "\n\n".join(docs) + "\n"


def load_text(args) -> tuple[str, str]:
    """The corpus text and a short description of where it came from."""
    if args.text:
        return Path(args.text).read_text(encoding="utf-8"), Path(args.text).name
    corpus = Path(args.corpus)
    if args.write_corpus or not corpus.exists():
        if not args.write_corpus:
            print(f"{corpus} missing: building it from the stdlib", flush=True)
        text = build_stdlib_corpus(args.corpus_chars)
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text(text, encoding="utf-8")
        print(f"wrote {corpus} ({len(text):,} chars, Python {sys.version.split()[0]})",
              flush=True)
    return corpus.read_text(encoding="utf-8"), "Python standard-library docstrings"


def split_text(text: str) -> tuple[str, str]:
    """First 90% of the characters for training, the last 10% for evaluation."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------

def train_tokenizer(train_text: str, vocab_size: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # feed paragraphs so that no single "sequence" is megabytes long
    chunks = [c for c in train_text.split("\n\n") if c]
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
        unk_token=None, model_max_length=max_length, clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # transformers 5 names the class TokenizersBackend; the old name loads in 4.x and 5.x
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    # transformers 5 no longer writes special_tokens_map.json; older readers like it
    stm = out / "special_tokens_map.json"
    if not stm.exists():
        stm.write_text(json.dumps({"bos_token": SPECIAL, "eos_token": SPECIAL,
                                   "pad_token": SPECIAL}, indent=2) + "\n")


def encode(tokenizer, text: str):
    import torch
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------
# model, training, evaluation
# --------------------------------------------------------------------------------------

def make_config(args, tokenizer):
    from transformers import LlamaConfig
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
    )


def evaluate(model, ids, seq_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens (a last partial window
    is dropped). Returns (perplexity, number of tokens scored)."""
    import torch
    model.eval()
    with torch.inference_mode():
        return _evaluate(model, ids, seq_len, batch_size)


def _evaluate(model, ids, seq_len, batch_size):
    import torch
    n = (len(ids) // seq_len) * seq_len
    windows = ids[:n].view(-1, seq_len)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count), count


def unigram_perplexity(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity of the (add-one smoothed) training unigram distribution on the eval ids."""
    import torch
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_ids].mean().item())


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def train(args, model, train_ids, eval_ids=None) -> dict:
    import torch
    gen = torch.Generator().manual_seed(args.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    tokens_per_step = args.batch_size * args.seq_len
    max_start = len(train_ids) - args.seq_len - 1

    def batch():
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        return torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])

    budget = None if args.steps else args.minutes * 60.0
    unknown = 10 ** 9
    total = args.steps or unknown  # with a time budget: fixed after the throughput probe
    if args.warmup is not None:
        warmup = args.warmup
    elif args.steps:
        warmup = max(1, int(0.05 * args.steps))
    else:
        warmup = 30

    model.train()
    t0 = time.time()
    ema = None
    step = 0
    last_loss = float("nan")
    while step < total:
        if budget is not None and step == 2:
            t_probe = time.time()  # the first steps are slow (allocations): not timed
        if budget is not None and step == max(3, args.probe_steps):
            # lay the schedule out over what the budget allows at the measured speed
            rate = (step - 2) / (time.time() - t_probe)
            total = max(step + 1, int(step + rate * (budget - (time.time() - t0))))
            print(f"throughput probe: {rate * tokens_per_step:,.0f} tok/s -> {total} steps "
                  f"in {args.minutes:g} min", flush=True)
        lr = lr_at(step, total, warmup, args.lr, args.lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        last_loss = out.loss.item()
        ema = last_loss if ema is None else 0.95 * ema + 0.05 * last_loss
        step += 1
        if step % args.log_every == 0 or step == total:
            el = time.time() - t0
            print(f"step {step:5d}/{total if total < unknown else '?'}  loss {last_loss:.4f}  "
                  f"(ema {ema:.4f})  lr {lr:.2e}  {step * tokens_per_step / el:,.0f} tok/s  "
                  f"{el / 60:.1f} min", flush=True)
        if args.eval_every and eval_ids is not None and step % args.eval_every == 0:
            t_eval = time.time()
            ppl, _ = evaluate(model, eval_ids, args.seq_len)
            model.train()
            t0 += time.time() - t_eval  # evaluation does not count against the budget
            print(f"  eval perplexity {ppl:.3f}", flush=True)
    elapsed = time.time() - t0
    return {"steps": step, "seconds": elapsed, "final_loss": last_loss, "ema_loss": ema,
            "tokens": step * tokens_per_step, "tok_per_s": step * tokens_per_step / elapsed}


def write_readme(out: Path, args, info: dict) -> None:
    cmd = "python " + " ".join(shlex.quote(a) for a in [_display_script()] + sys.argv[1:])
    n_params = info["params"]
    where = ("the repository root" if Path.cwd().resolve() == REPO
             else f"`{Path.cwd()}`")
    text = f"""# mlakit demo model: tiny Llama (GQA) trained on {info['source']}

A small `LlamaForCausalLM` trained from scratch by `scripts/train_demo.py`, so that mlakit
has a real grouped-query-attention model to convert to MLA, calibrate and validate offline.
Weights are stored in {args.save_dtype} ({info['weights_mb']:.1f} MB).

| | |
|---|---|
| parameters | {n_params:,} ({n_params / 1e6:.2f} M, embeddings tied) |
| layers | {args.layers} |
| hidden size / intermediate | {args.hidden_size} / {args.intermediate_size} |
| attention heads / key-value heads / head_dim | {args.heads} / {args.kv_heads} / {args.head_dim} |
| vocabulary | {args.vocab_size} (byte-level BPE; bos = eos = pad = `<\\|endoftext\\|>`, not added by the tokenizer and not used in training) |
| rope_theta / max positions | {args.rope_theta:g} / {args.max_position_embeddings} |
| corpus | {info['source']}: {info['chars']:,} characters, first 90% train ({info['train_tokens']:,} tokens), last 10% eval ({info['eval_tokens']:,} tokens) |
| training | {info['steps']} steps x {args.batch_size} x {args.seq_len} tokens = {info['tokens']:,} tokens, AdamW lr {args.lr:g} warmup+cosine, fp32 on CPU, {info['seconds'] / 60:.1f} min at {info['tok_per_s']:,.0f} tok/s ({args.threads} threads) |
| final train loss | {info['final_loss']:.4f} (smoothed {info['ema_loss']:.4f}) |
| eval perplexity | **{info['ppl_saved']:.2f}** (saved {args.save_dtype} weights, computed in fp32; fp32 weights before saving: {info['ppl_fp32']:.2f}) |
| unigram baseline perplexity | {info['ppl_unigram']:.2f} |

Eval perplexity is over non-overlapping windows of {args.seq_len} tokens of the held-out last
10% of the corpus (the first token of each window is not scored).

Trained with (from {where}, torch {info['torch']}, transformers {info['transformers']}):

```
{cmd}
```

Load with `transformers.AutoModelForCausalLM.from_pretrained(path)` and
`transformers.AutoTokenizer.from_pretrained(path)`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def _display_script() -> str:
    try:
        return os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())
    except ValueError:
        return sys.argv[0]


def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    d = p.add_argument_group("data")
    d.add_argument("--text", help="UTF-8 text file to train on (default: the bundled stdlib "
                                  "docstring corpus)")
    d.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help="where the stdlib docstring corpus is read from / written to")
    d.add_argument("--write-corpus", action="store_true",
                   help="rebuild the stdlib docstring corpus from this interpreter and write it")
    d.add_argument("--corpus-only", action="store_true",
                   help="stop after writing/reading the corpus (with --write-corpus)")
    d.add_argument("--corpus-chars", type=int, default=2_000_000,
                   help="size cap of the stdlib docstring corpus in characters")
    m = p.add_argument_group("model")
    m.add_argument("--vocab-size", type=int, default=2048)
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--heads", type=int, default=4, help="attention (query) heads")
    m.add_argument("--kv-heads", type=int, default=2, help="key-value heads")
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--intermediate-size", type=int, default=768)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--max-position-embeddings", type=int, default=1024)
    m.add_argument("--rms-norm-eps", type=float, default=1e-5)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (overrides --minutes)")
    t.add_argument("--minutes", type=float, default=12.0,
                   help="wall-time budget for training when --steps is not given")
    t.add_argument("--probe-steps", type=int, default=10,
                   help="steps timed to turn --minutes into a step count")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final learning rate as a fraction of the peak")
    t.add_argument("--warmup", type=int, default=None,
                   help="warmup steps (default: 5%% of --steps, or 30 with --minutes)")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=0,
                   help="also print the eval perplexity every this many steps (0: only at "
                        "the end; evaluation time is not counted in tok/s or --minutes)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    o.add_argument("--save-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = p.parse_args(argv)
    if args.heads * args.head_dim <= 0 or args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    text, source = load_text(args)
    if args.corpus_only:
        print(f"corpus: {len(text):,} chars")
        return 0

    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_text, eval_text = split_text(text)
    print(f"corpus: {source}, {len(text):,} chars -> train {len(train_text):,} / "
          f"eval {len(eval_text):,}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_text, args.vocab_size, args.max_position_embeddings)
    save_tokenizer(tokenizer, out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # check the saved files load offline
    sample = eval_text[:2000]
    if tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) != sample:
        raise SystemExit("tokenizer does not round-trip the text")
    if len(tokenizer) != args.vocab_size:
        print(f"warning: tokenizer has {len(tokenizer)} entries, --vocab-size is "
              f"{args.vocab_size}", flush=True)

    train_ids = encode(tokenizer, train_text)
    eval_ids = encode(tokenizer, eval_text)
    print(f"tokens: train {len(train_ids):,} ({len(train_text) / len(train_ids):.2f} chars/tok)"
          f", eval {len(eval_ids):,}", flush=True)

    config = make_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    stats = train(args, model, train_ids, eval_ids)
    ppl_fp32, n_eval = evaluate(model, eval_ids, args.seq_len)
    ppl_uni = unigram_perplexity(train_ids, eval_ids, args.vocab_size)
    print(f"trained {stats['steps']} steps in {stats['seconds'] / 60:.1f} min, "
          f"{stats['tok_per_s']:,.0f} tok/s; final loss {stats['final_loss']:.4f}", flush=True)
    print(f"eval perplexity (fp32 weights): {ppl_fp32:.3f} over {n_eval:,} tokens; "
          f"unigram baseline {ppl_uni:.2f}", flush=True)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.save_dtype]
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=True, temperature=0.8, top_k=50,
        max_new_tokens=200)
    model.save_pretrained(out, safe_serialization=True)
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes it 0600

    reloaded, info = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"saved checkpoint does not load cleanly: {problems}")
    ppl_saved, _ = evaluate(reloaded, eval_ids, args.seq_len)
    print(f"eval perplexity (saved {args.save_dtype} weights, fp32 compute): {ppl_saved:.3f}",
          flush=True)

    write_readme(out, args, {
        "source": source, "chars": len(text), "train_tokens": len(train_ids),
        "eval_tokens": len(eval_ids), "params": n_params,
        "weights_mb": (out / "model.safetensors").stat().st_size / 2 ** 20,
        "ppl_fp32": ppl_fp32, "ppl_saved": ppl_saved, "ppl_unigram": ppl_uni,
        "torch": torch.__version__, "transformers": transformers.__version__, **stats,
    })
    print(f"saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
