"""Quick per-task accuracy of the demo model (or a training checkpoint) on fresh `shapes`
samples, normally and blind.

Blind: the attention mask is 0 at every image-token position, so no token can attend to
the image tokens at any layer, which is what pruning every operation of every visual token
at every layer amounts to (their own updates then influence nothing). Positions are kept
as in the unpruned prompt (explicit ``position_ids``).

    python scripts/eval_demo_quick.py --n 300 --seed 7          # load_demo() weights
    python scripts/eval_demo_quick.py --model DIR --n 100       # a saved folder
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from dop.demo import shapes
from dop.demo.model import build_prompt


@torch.no_grad()
def greedy(model, processor, samples, blind: bool = False, max_new_tokens: int = 3, batch_size: int = 32):
    """Greedy answers (decoded strings) for a list of samples, in order. Samples are batched
    by prompt length, so no padding is ever needed."""
    image_id = model.config.image_token_index
    eos = processor.tokenizer.eos_token_id
    by_len: dict[int, list[tuple[int, dict, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for i, s in enumerate(samples):
        enc = processor(images=[s["image"]], text=[build_prompt(processor, s["question"])], return_tensors="pt")
        by_len[enc["input_ids"].shape[1]].append((i, s, enc["input_ids"][0], enc["pixel_values"][0]))
    out: list[str] = [""] * len(samples)
    for group in by_len.values():
        for b in range(0, len(group), batch_size):
            chunk = group[b : b + batch_size]
            ids = torch.stack([c[2] for c in chunk])
            pix = torch.stack([c[3] for c in chunk])
            visual = ids == image_id
            done = torch.zeros(len(chunk), dtype=torch.bool)
            gen: list[list[int]] = [[] for _ in chunk]
            for _ in range(max_new_tokens):
                mask = torch.ones_like(ids)
                if blind:
                    mask[:, : visual.shape[1]][visual] = 0
                pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
                logits = model(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=pos).logits[:, -1]
                nxt = logits.argmax(-1)
                for j, t in enumerate(nxt.tolist()):
                    if not done[j]:
                        if t == eos:
                            done[j] = True
                        else:
                            gen[j].append(t)
                if done.all():
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            for (i, *_), g in zip(chunk, gen):
                out[i] = processor.tokenizer.decode(g, skip_special_tokens=True).strip()
    return out


def score(samples, predictions) -> dict[str, float]:
    hits: dict[str, list[int]] = defaultdict(list)
    for s, p in zip(samples, predictions):
        hits[s["task"]].append(int(p.lower() in [a.lower() for a in s["answers"]]))
    acc = {t: sum(h) / len(h) for t, h in hits.items()}
    acc["avg"] = sum(acc.values()) / len(acc)
    return acc


def evaluate(model, processor, samples, blind: bool = False) -> dict[str, float]:
    return score(samples, greedy(model, processor, samples, blind=blind))


def fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t}={acc[t]:.3f}" for t in (*[t for t in shapes.TASKS if t in acc], "avg"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="folder saved with save_pretrained (default: the bundled demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=300, help="samples in all (round-robin over the 5 tasks)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-generate", type=int, default=0, help="compare with model.generate on this many samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from dop.demo import load_demo

        model, processor = load_demo()
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    samples = shapes.make_samples(args.split, args.n, seed=args.seed)
    counts = defaultdict(int)
    for s in samples:
        counts[s["task"]] += 1
    print(f"{args.split} seed={args.seed} n={args.n} per task: {dict(counts)}")
    t0 = time.time()
    normal = evaluate(model, processor, samples)
    print(f"normal: {fmt(normal)}  ({time.time() - t0:.0f}s)")
    t0 = time.time()
    blind = evaluate(model, processor, samples, blind=True)
    print(f"blind:  {fmt(blind)}  ({time.time() - t0:.0f}s)")
    chance = {t: shapes.chance_accuracy(t) for t in shapes.TASKS}
    chance["avg"] = sum(chance.values()) / len(chance)
    print(f"chance: {fmt(chance)}")
    if args.check_generate:
        sub = samples[: args.check_generate]
        mine = greedy(model, processor, sub)
        same = 0
        for s, m in zip(sub, mine):
            enc = processor(images=[s["image"]], text=[build_prompt(processor, s["question"])], return_tensors="pt")
            g = model.generate(**enc, max_new_tokens=3, do_sample=False)
            text = processor.tokenizer.decode(g[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            same += text == m
        print(f"model.generate agrees with the greedy loop on {same}/{len(sub)} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
