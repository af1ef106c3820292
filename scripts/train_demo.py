"""Train the demo MLLM from scratch on the `shapes` train stream, on CPU.

Recipe (see src/dop/demo/README.md for the figures):
  stage A  the CLIP tower alone, with linear heads on its patch features predicting, for the
           patch holding an object's centre, the object's kind (shape or letter) and colour;
  stage B  the whole LLaVA end to end: answer-only cross-entropy, plus auxiliary linear heads
           on the decoder's hidden states at the visual positions (after layers listed in
           --aux-layers) predicting that patch's kind, colour, row, column and its role in
           the question (not involved / the object asked about / the reference object).
           The heads are discarded; the exported checkpoint is a plain LLaVA.
  fine-tune (optional: --init-from an export, --tower-steps 0) with operation dropout:
           some samples have their visual tokens skip attention / MLP from a random depth on
           (--op-depth-frac), some lose a random share of the visual tokens that do not show
           the objects asked about (--op-token-frac), so that pruning either way costs
           accuracy gradually rather than all at once. The answer loss and the early
           read-out see every sample; the attention supervision and the patch heads only
           the untouched ones.
AdamW, linear warm-up then cosine decay, fixed seeds, one thread. Checkpoints go to --ckpt-dir
every --ckpt-every steps; a restarted run resumes from the last one. At the end (or with
--export-only) the weights are saved with save_pretrained to --export-dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo_quick import evaluate, fmt  # noqa: E402

from dop.demo import DEMO_DIR, shapes  # noqa: E402
from dop.demo.model import IMAGE_TOKEN, Sizes, build_model, build_processor, build_prompt  # noqa: E402
from dop.evaluate.loading import write_prompt_marker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_KIND = 1 + len(shapes.SHAPES) + len(shapes.LETTERS)  # none, shapes, letters
N_COLOR = 1 + len(shapes.COLORS)
COLOR_INDEX = {c: i + 1 for i, c in enumerate(shapes.COLORS)}
KIND_INDEX = {s: i + 1 for i, s in enumerate(shapes.SHAPES)}
KIND_INDEX.update({ch: 1 + len(shapes.SHAPES) + i for i, ch in enumerate(shapes.LETTERS)})


SHAPE_WORDS = {s: s for s in shapes.SHAPES} | {p: s for s, p in shapes.PLURALS.items()}


def asked_attributes(question: str) -> tuple[list[str], list[str]]:
    """The colours and the shapes a question names, in order (the object asked about first,
    then the reference object of `position`)."""
    words = [w.strip("?.,").lower() for w in question.split()]
    return [w for w in words if w in shapes.COLORS], [SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS]


def match_class(value, asked: list[str]) -> int:
    """-100 when the question names no such attribute; else 0 (no match), 1 (matches the first
    one named), 2 (matches only the second)."""
    if not asked:
        return -100
    for i, a in enumerate(asked[:2]):
        if value == a:
            return i + 1
    return 0


def patch_labels(scene: shapes.Scene, grid: int, patch: int, question: str = "") -> torch.Tensor:
    """(5, grid*grid) long: kind, colour and role of the object centred in each patch, and
    whether its colour / its shape matches one the question names (-100 where no object is
    centred or the question names none)."""
    lab = torch.zeros(5, grid * grid, dtype=torch.long)
    lab[3:] = -100
    colors, kinds = asked_attributes(question)
    for o in scene.objects:
        if o.kind == "label":
            continue
        r = min(grid - 1, max(0, int(o.cy // patch)))
        c = min(grid - 1, max(0, int(o.cx // patch)))
        lab[0, r * grid + c] = KIND_INDEX[o.name]
        lab[1, r * grid + c] = COLOR_INDEX.get(o.color, 0)
        lab[2, r * grid + c] = o.role
        lab[3, r * grid + c] = match_class(o.color, colors)
        lab[4, r * grid + c] = match_class(o.name, kinds)
    return lab


def balanced_ce(logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged within groups of patches, then over the groups present; targets
    of -100 are left out (zero when nothing is left). By default the groups are "holds an
    object centre" (label > 0) and "empty": objects cover only a few of the 144 patches, and a
    plain mean is already small when every patch is called empty."""
    t = target.flatten()
    ce = F.cross_entropy(logits.flatten(0, 1), t.clamp(min=0), reduction="none")
    g = (t > 0).long() if groups is None else groups.flatten()
    means = [ce[(g == k) & (t >= 0)].mean() for k in g[t >= 0].unique()]
    return torch.stack(means).mean() if means else logits.sum() * 0.0


class Heads(nn.Module):
    """Auxiliary per-patch classifiers (training only)."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.kind = nn.Linear(d, N_KIND)
        self.color = nn.Linear(d, N_COLOR)
        self.role = nn.Linear(d, 3)
        self.cmatch = nn.Linear(d, 3)  # colour matches the question's first / second colour
        self.smatch = nn.Linear(d, 3)  # shape matches the question's first / second shape
        self.row = nn.Linear(d, grid)
        self.col = nn.Linear(d, grid)

    def loss(self, h: torch.Tensor, lab: torch.Tensor, grid: int, with_role: bool = True,
             match_weight: float = 0.0) -> torch.Tensor:
        # h: (B, P, d); lab: (B, 5, P) from patch_labels
        B, P, _ = h.shape
        pos = torch.arange(P)
        rows = (pos // grid).expand(B, -1)
        cols = (pos % grid).expand(B, -1)
        loss = balanced_ce(self.kind(h), lab[:, 0]) + balanced_ce(self.color(h), lab[:, 1])
        loss = loss + 0.5 * F.cross_entropy(self.row(h).flatten(0, 1), rows.flatten())
        loss = loss + 0.5 * F.cross_entropy(self.col(h).flatten(0, 1), cols.flatten())
        if with_role:  # objects that are not the one asked about count as a third group
            loss = loss + balanced_ce(self.role(h), lab[:, 2], groups=lab[:, 2] + 3 * (lab[:, 0] > 0))
        if match_weight > 0:  # the two halves of "is this the object asked about?", separately
            loss = loss + match_weight * (balanced_ce(self.cmatch(h), lab[:, 3], groups=lab[:, 3])
                                          + balanced_ce(self.smatch(h), lab[:, 4], groups=lab[:, 4]))
        return loss


class Batcher:
    """Batches of the train stream, resumable at any sample index."""

    def __init__(self, processor, seed: int, grid: int, patch: int, max_count_objects: int | None = None):
        self.p = processor
        self.seed = seed
        self.grid, self.patch = grid, patch
        self.tok = processor.tokenizer
        self.cache: dict[str, list[int]] = {}
        self.n_img = grid * grid

    def prompt_ids(self, question: str) -> list[int]:
        ids = self.cache.get(question)
        if ids is None:
            text = build_prompt(self.p, question).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_img)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self.cache[question] = ids
        return ids

    def check(self, sample) -> None:
        """The fast path must give exactly what the processor gives."""
        enc = self.p(images=[sample["image"]], text=[build_prompt(self.p, sample["question"])], return_tensors="pt")
        assert enc["input_ids"][0].tolist() == self.prompt_ids(sample["question"]), "prompt ids differ from processor"

    def batch(self, start: int, size: int, tasks=shapes.TASKS):
        samples, scenes = [], []
        for i in range(start, start + size):
            task = tasks[i % len(tasks)]
            s, sc = shapes.make_sample("train", self.seed, i, task, i // len(tasks))
            samples.append(s)
            scenes.append(sc)
        pix = self.p.image_processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
        seqs, labs = [], []
        for s in samples:
            p = self.prompt_ids(s["question"])
            a = self.tok(s["answers"][0], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            seqs.append(p + a)
            labs.append([-100] * len(p) + a)
        T = max(len(x) for x in seqs)
        ids = torch.full((size, T), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((size, T), -100, dtype=torch.long)
        mask = torch.zeros((size, T), dtype=torch.long)
        for j, (x, y) in enumerate(zip(seqs, labs)):  # right padding: positions stay 0..n-1
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, : len(y)] = torch.tensor(y)
            mask[j, : len(x)] = 1
        plab = torch.stack([patch_labels(sc, self.grid, self.patch, s["question"]) for s, sc in zip(samples, scenes)])
        return ids, mask, labels, pix, plab


def attention_targets(visual: torch.Tensor, roles: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Target attention of heads 0 and 1 at the answer position: head h spreads its weight
    evenly over the visual tokens of role h + 1 (the object asked about; the reference object
    or second letter, else again role 1) and the first token, which acts as a sink: with n
    such tokens each gets 1 / (n + 1), so the sink's share also tells how many there are."""
    B, T = visual.shape
    tgt = torch.zeros(B, 2, T)
    for b in range(B):
        pos = visual[b].nonzero().squeeze(1)
        r = roles[b]
        for h in range(2):
            sel = pos[r == h + 1]
            if h == 1 and sel.numel() == 0:
                sel = pos[r == 1]
            tgt[b, h, 0] = 1.0
            tgt[b, h, sel] = 1.0
            tgt[b, h] /= tgt[b, h].sum()
    return tgt


class OpDropout:
    """Training-time operation dropout, under the masked semantics of docs/design.md, "What skipping means": per sample,
    visual tokens stop receiving attention (and stop being attended to) from layer ``attn[b, t]``
    on, and stop receiving the MLP update from layer ``mlp[b, t]`` on. Text tokens are never
    touched. Set ``depths`` before a forward pass; ``None`` leaves the model unchanged."""

    def __init__(self, model):
        self.depths: tuple[torch.Tensor, torch.Tensor] | None = None  # (attn, mlp), each (B, T)
        for i, layer in enumerate(model.model.language_model.layers):
            layer.self_attn.register_forward_pre_hook(self._kv_hook(i), with_kwargs=True)
            layer.self_attn.register_forward_hook(self._q_hook(i))
            layer.mlp.register_forward_hook(self._mlp_hook(i))

    def _kv_hook(self, i):
        def pre(module, args, kwargs):
            if self.depths is None:
                return None
            m = kwargs.get("attention_mask")
            if m is None:  # causal without padding (sdpa's fast path): spell the mask out
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                m = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()[None, None]
                if module.config._attn_implementation == "eager":
                    m = torch.zeros(m.shape, dtype=h.dtype).masked_fill(~m, torch.finfo(h.dtype).min)
            keep = (self.depths[0] > i)[:, None, None, : m.shape[-1]]
            kwargs["attention_mask"] = m & keep if m.dtype == torch.bool else m.masked_fill(~keep, torch.finfo(m.dtype).min)
            return args, kwargs
        return pre

    def _q_hook(self, i):
        def post(module, args, out):
            if self.depths is None:
                return None
            keep = (self.depths[0] > i)[..., None].to(out[0].dtype)
            return (out[0] * keep, *out[1:])
        return post

    def _mlp_hook(self, i):
        def post(module, args, out):
            if self.depths is None:
                return None
            return out * (self.depths[1] > i)[..., None].to(out.dtype)
        return post


def draw_op_depths(visual: torch.Tensor, roles: torch.Tensor, grid: int, layers: int, seed: int, first: int,
                   p_depth: float, p_tokens: float) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-token depths for :class:`OpDropout`, drawn per sample (index ``first + b`` of the
    stream, so a resumed run draws the same). With probability ``p_depth`` every visual token
    keeps attention only in the first ``U{1..L-1}`` layers and the MLP in the first ``U{0..L-1}``
    (what DOP's D_attn / D_mlp do); independently, with probability ``p_tokens`` a fraction
    ``U(0.2, 0.9)`` of the visual tokens away from the objects the question names (role 0
    after growing the roles by one patch) is dropped from every layer (what token pruning
    does). Returns the depths and a mask of the samples left untouched."""
    B, T = visual.shape
    attn = torch.full((B, T), layers, dtype=torch.long)
    mlp = torch.full((B, T), layers, dtype=torch.long)
    clean = torch.ones(B, dtype=torch.bool)
    near = F.max_pool2d((roles > 0).float().view(B, 1, grid, grid), 3, 1, 1).view(B, -1) > 0
    for b in range(B):
        rng = random.Random(f"opdrop/{seed}/{first + b}")
        pos = visual[b].nonzero().squeeze(1)
        if rng.random() < p_depth:
            attn[b, pos] = rng.randint(1, layers - 1)
            mlp[b, pos] = rng.randint(0, layers - 1)
            clean[b] = False
        if rng.random() < p_tokens:
            free = pos[~near[b]].tolist()
            drop = rng.sample(free, int(rng.uniform(0.2, 0.9) * len(free)))
            attn[b, drop] = 0
            mlp[b, drop] = 0
            clean[b] = False
    return (attn, mlp), clean


def lr_at(step: int, progress: float, warmup: int, base: float, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * base`` as
    ``progress`` goes from 0 to 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def log(msg: str, path: Path) -> None:
    line = f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S} {msg}"
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def export(model, processor, out: Path, meta: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_prompt_marker(tmp, "demo")  # the library reads this, not training.json, to pick the demo prompt
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="stage B steps (the cosine schedule's length)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--tower-steps", type=int, default=300, help="stage A steps (0: skip)")
    ap.add_argument("--tower-lr", type=float, default=2e-3)
    ap.add_argument("--tower-lr-scale", type=float, default=0.3, help="tower LR / LR in stage B (0 freezes it)")
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--aux-layers", default="2,4", help="decoder layers whose outputs get the aux heads")
    ap.add_argument("--match-weight", type=float, default=0.0,
                    help="weight of the aux heads telling whether a patch's colour / shape matches the question's")
    ap.add_argument("--deep-weight", type=float, default=0.0,
                    help="weight of answer cross-entropy read out (final norm + lm_head) after --deep-layers")
    ap.add_argument("--deep-layers", default="6,7", help="hidden-state indices for the deep answer supervision")
    ap.add_argument("--attn-weight", type=float, default=0.5, help="weight of the attention supervision")
    ap.add_argument("--attn-layers", default="4,5", help="decoder layers whose heads 0/1 are supervised")
    ap.add_argument("--blind-frac", type=float, default=0.1,
                    help="share of training samples whose image tokens are masked out of attention")
    ap.add_argument("--task-mix", default=",".join(shapes.TASKS),
                    help="round-robin order of tasks in the training batches (repeat a task to weight it)")
    ap.add_argument("--no-attn-exist-no", action="store_true",
                    help="no attention supervision on `exist` samples whose answer is no")
    ap.add_argument("--op-depth-frac", type=float, default=0.0,
                    help="fraction of samples whose visual tokens skip attention / MLP from a random depth on")
    ap.add_argument("--op-token-frac", type=float, default=0.0,
                    help="fraction of samples that lose a random share of the visual tokens away from the objects asked about")
    ap.add_argument("--init-from", default=None, help="start from the weights of this exported LLaVA folder (fine-tuning)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vision-width", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="demo", help="run name: <ckpt-root>/<name>/")
    ap.add_argument("--ckpt-root", default=None, help="folder of the runs' checkpoints (default: checkpoints/ in the repo)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=150, help="val samples per evaluation (all tasks)")
    ap.add_argument("--until", default=None, help="stop (and export) at this UTC time HH:MM")
    ap.add_argument("--export-dir", default=None, help=f"where the final weights go (default {DEMO_DIR})")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ckpt_dir = (Path(args.ckpt_root) if args.ckpt_root else ROOT / "checkpoints") / args.name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_path = ckpt_dir / "train.log"
    ckpt_path = ckpt_dir / "last.pt"
    export_dir = Path(args.export_dir) if args.export_dir else DEMO_DIR

    sizes = Sizes(width=args.width, layers=args.layers, heads=args.heads, mlp=4 * args.width,
                  vision_width=args.vision_width, vision_layers=args.vision_layers)
    processor = build_processor()
    model = build_model(processor, sizes)
    attn_layers = [int(x) for x in args.attn_layers.split(",") if x] if args.attn_weight > 0 else []
    if attn_layers:
        model.set_attn_implementation("eager")  # attention probabilities are needed for the loss
    if args.init_from:
        from transformers import LlavaForConditionalGeneration

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(args.init_from).state_dict())
    op_drop = OpDropout(model) if args.op_depth_frac > 0 or args.op_token_frac > 0 else None
    grid = sizes.image_size // sizes.patch_size
    heads_t = Heads(sizes.vision_width, grid)
    aux_layers = [int(x) for x in args.aux_layers.split(",") if x]
    deep_layers = [int(x) for x in args.deep_layers.split(",") if x]
    heads_d = nn.ModuleList([Heads(sizes.width, grid) for _ in aux_layers])
    batcher = Batcher(processor, args.seed, grid, sizes.patch_size)
    batcher.check(shapes.make_sample("train", args.seed, 0, "position")[0])

    state = {"stage": "A", "step": 0, "elapsed": 0.0}
    tower_params = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower_params}
    other_params = [p for p in model.parameters() if id(p) not in tower_ids] + list(heads_d.parameters())
    opt_a = torch.optim.AdamW(tower_params + list(heads_t.parameters()), lr=args.tower_lr, weight_decay=args.wd, betas=(0.9, 0.98))
    groups = [{"params": other_params, "scale": 1.0}]
    if args.tower_lr_scale > 0:
        groups.append({"params": tower_params, "scale": args.tower_lr_scale})
    else:
        for p in tower_params:
            p.requires_grad_(False)
    opt_b = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))

    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file
        model.load_state_dict(ck["model"])
        heads_t.load_state_dict(ck["heads_t"])
        heads_d.load_state_dict(ck["heads_d"])
        opt_a.load_state_dict(ck["opt_a"])
        opt_b.load_state_dict(ck["opt_b"])
        state = ck["state"]
        torch.set_rng_state(ck["torch_rng"])
        if state["stage"] == "B" and "t0" not in state:
            state["t0"] = time.time()  # start of the time-based schedule (--until)
        log(f"resumed from {ckpt_path}: stage {state['stage']} step {state['step']}", log_path)
    else:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"start {vars(args)}; model {n_params / 1e6:.2f} M parameters ({n_params * 4 / 2**20:.1f} MiB fp32)", log_path)

    meta = {"command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]), "args": vars(args)}

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "heads_t": heads_t.state_dict(), "heads_d": heads_d.state_dict(),
                    "opt_a": opt_a.state_dict(), "opt_b": opt_b.state_dict(), "state": state,
                    "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, ckpt_path)

    def do_export():
        model.eval()
        meta.update({"stage_b_steps": state["step"] if state["stage"] == "B" else 0, "train_seconds": round(state["elapsed"])})
        export(model, processor, export_dir, meta)
        log(f"exported weights to {export_dir}", log_path)

    if args.export_only:
        do_export()
        return 0

    val = shapes.make_samples("val", args.eval_n, seed=1)
    deadline = None
    if args.until:
        hh, mm = map(int, args.until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if deadline < now:
            deadline += dt.timedelta(days=1)

    def out_of_time() -> bool:
        return deadline is not None and dt.datetime.now(dt.timezone.utc) >= deadline

    # ---- stage A: the vision tower alone on per-patch labels
    model.train()
    t_last = time.time()
    while state["stage"] == "A" and state["step"] < args.tower_steps and not out_of_time():
        step = state["step"]
        for g in opt_a.param_groups:
            g["lr"] = lr_at(step, step / args.tower_steps, min(50, args.warmup), args.tower_lr)
        ids, mask, labels, pix, plab = batcher.batch(10_000_000 + step * args.batch, args.batch)
        hs = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1][:, 1:]
        loss = heads_t.loss(hs, plab, grid, with_role=False)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower_params, 1.0)
        opt_a.step()
        state["step"] += 1
        now = time.time()
        state["elapsed"] += now - t_last
        t_last = now
        if state["step"] % 25 == 0:
            log(f"A {state['step']} loss {loss.item():.4f} ({state['elapsed']:.0f}s)", log_path)
        if state["step"] % args.ckpt_every == 0:
            save()
    if state["stage"] == "A" and (state["step"] >= args.tower_steps):
        state.update(stage="B", step=0, t0=time.time())
        save()

    def progress(step: int) -> float:
        """Fraction of stage B done: by steps, or by wall time when --until is given."""
        frac = step / args.steps
        if deadline is not None:
            t0 = state.get("t0", time.time())
            frac = max(frac, (time.time() - t0) / max(1.0, deadline.timestamp() - t0))
        return frac

    # ---- stage B: end to end
    run_loss, run_aux, run_att, n_run = 0.0, 0.0, 0.0, 0
    while state["stage"] == "B" and state["step"] < args.steps and not out_of_time():
        model.train()
        step = state["step"]
        lr = lr_at(step, progress(step), args.warmup, args.lr)
        for g in opt_b.param_groups:
            g["lr"] = lr * g["scale"]
        ids, mask, labels, pix, plab = batcher.batch(step * args.batch, args.batch, tuple(args.task_mix.split(",")))
        visual = ids == model.config.image_token_index
        # image dropout: a few samples see no image at all (attention mask 0 on its tokens), so
        # the model learns to answer from the question alone with a guess from the answer set
        blind = torch.tensor([random.Random(f"blind/{args.seed}/{step * args.batch + j}").random() < args.blind_frac
                              for j in range(args.batch)])
        mask = mask.masked_fill(visual & blind[:, None], 0)
        keep = ~blind
        if op_drop is not None:  # training-only operation / token dropout; attention and patch-head losses skip those samples
            op_drop.depths, clean = draw_op_depths(visual, plab[:, 2], grid, sizes.layers, args.seed, step * args.batch,
                                                   args.op_depth_frac, args.op_token_frac)
            keep = keep & clean
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, output_hidden_states=True,
                    output_attentions=bool(attn_layers))
        logits = out.logits[:, :-1]
        ans_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        aux = torch.zeros(())
        for head, layer in zip(heads_d, aux_layers):
            h = out.hidden_states[layer][visual].view(ids.shape[0], grid * grid, -1)
            aux = aux + head.loss(h[keep], plab[keep], grid, match_weight=args.match_weight) / len(aux_layers)
        deep = torch.zeros(())
        if args.deep_weight > 0:  # the answer, read out early: earlier layers must gather it
            tgt = labels[:, 1:]
            sel = tgt != -100
            for layer in deep_layers:
                hd = model.model.language_model.norm(out.hidden_states[layer][:, :-1][sel])
                deep = deep + F.cross_entropy(model.lm_head(hd), tgt[sel]) / len(deep_layers)
        att = torch.zeros(())
        if attn_layers:
            qpos = (labels != -100).int().argmax(1) - 1  # the last prompt token predicts the answer
            targets = attention_targets(visual, plab[:, 2], qpos)  # (B, 2, T)
            sup = keep.clone()
            if args.no_attn_exist_no:  # "no" answers of `exist`: leave the attention free
                mix = args.task_mix.split(",")
                for j in range(ids.shape[0]):
                    if mix[(step * args.batch + j) % len(mix)] == "exist" and not (plab[j, 2] > 0).any():
                        sup[j] = False
            for layer in attn_layers:
                a = out.attentions[layer][torch.arange(ids.shape[0]), :2, qpos]  # (B, 2, T)
                att = att - (targets * torch.log(a + 1e-9)).sum(-1)[sup].mean() / len(attn_layers)
        if op_drop is not None:
            op_drop.depths = None
        loss = ans_loss + args.aux_weight * aux + args.attn_weight * att + args.deep_weight * deep
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt_b.param_groups for p in g["params"]], 1.0)
        opt_b.step()
        state["step"] += 1
        now = time.time()
        state["elapsed"] += now - t_last
        t_last = now
        run_loss += ans_loss.item()
        run_aux += aux.item()
        run_att += att.item()
        n_run += 1
        if state["step"] % 25 == 0:
            log(f"B {state['step']} answer {run_loss / n_run:.4f} aux {run_aux / n_run:.4f} attn {run_att / n_run:.4f} lr {lr:.2e} "
                f"({state['elapsed']:.0f}s)", log_path)
            run_loss, run_aux, run_att, n_run = 0.0, 0.0, 0.0, 0
        if state["step"] % args.ckpt_every == 0:
            save()
        if state["step"] % args.eval_every == 0:
            model.eval()
            acc = evaluate(model, processor, val)
            log(f"eval B {state['step']} val: {fmt(acc)}", log_path)
            log(f"eval B {state['step']} blind val: {fmt(evaluate(model, processor, val, blind=True))}", log_path)
            t_last = time.time()  # evaluation time is not training time
    save()
    model.eval()
    acc = evaluate(model, processor, val)
    blind = evaluate(model, processor, val, blind=True)
    log(f"final stage {state['stage']} step {state['step']} ({state['elapsed']:.0f}s train) val: {fmt(acc)}", log_path)
    log(f"final blind val: {fmt(blind)}", log_path)
    if not args.no_export:
        do_export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
