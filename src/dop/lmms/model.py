"""The lmms-eval model ``dop``: any checkpoint dop loads, run under an operation-pruning
policy (docs/eval.md, "lmms-eval").

    python -m lmms_eval --model dop --model_args pretrained=demo,policy=policy.json \\
        --tasks shapes_test --include_path DIR

Model arguments (``--model_args k=v,...``):

- ``pretrained``: ``demo``, a hub id or a local checkpoint folder (as ``dop eval --model``);
- ``policy``: a policy file (dop-policy/1 or /2); ``ranker``: overrides the policy's ranker;
- ``budget`` with ``search_data`` (and ``search_samples``, default 25; ``space``, default
  dop; ``ranker``, default vispruner): search a policy first with ``dop.search.search``; the
  policy is cached in ``log_dir`` under a name derived from these arguments, and the log
  names the file; a later run with the same arguments reuses it;
- no policy and no budget: the model runs unpruned;
- ``device``, ``dtype`` (float32), ``attn_implementation`` (sdpa), ``trust_remote_code``;
- ``batch_size``: requests handed to one generation call. dop's runtime generates at batch
  size 1 for now, so a larger value is accepted and the requests of a batch are run one
  after the other (a log line says so); ``_generate_batch`` is the one place to change;
- ``log_dir`` (default ``dop_lmms``): per-request FLOPs go to ``log_dir/flops.rank<R>.jsonl``
  (one JSON object per request: task, doc_id, visual and text token counts, decoder and
  total FLOPs in both conventions, ``dop`` and ``paper``), truncated when the model starts.

Requests: ``generate_until`` (greedy unless the task asks for sampling; stop strings cut
the answer as lm-eval does), ``loglikelihood`` (sum of the continuation's log-probabilities
and whether greedy decoding gives it), ``generate_until_multi_round`` (not supported: a
clear error). Several processes (``accelerate launch --num_processes N -m lmms_eval ...``)
each take their own device (``cuda:<local rank>``, or the CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from dop.batching import collate, pad_token_id
from dop.evaluate.datasets import load_dataset
from dop.evaluate.inputs import on_model
from dop.evaluate.loading import chat_prompt, load_model, num_decoder_layers, prompt_builder_for
from dop.evaluate.runner import DEFAULT_MAX_NEW_TOKENS, FlopsCache, greedy_config
from dop.models import get_adapter
from dop.policy import Policy
from dop.rankers import resolve_ranker
from dop.runtime import apply_policy
from dop.search import search

DEFAULT_LOG_DIR = "dop_lmms"
DTYPES = ("float32", "bfloat16", "float16")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _cut_at_stops(text: str, until) -> str:
    for stop in until or ():
        if stop:
            text = text.split(stop)[0]
    return text


def _check_arguments(kwargs: dict, *, policy, budget, search_data, ranker, dtype) -> None:
    """The model arguments lmms-eval passed make sense together (one-line errors)."""
    if kwargs:
        raise ValueError(
            f"dop: unknown model argument(s) {', '.join(sorted(kwargs))}; known: pretrained, policy, ranker, "
            f"budget, search_data, search_samples, space, device, dtype, attn_implementation, "
            f"trust_remote_code, batch_size, log_dir, seed"
        )
    if policy and budget:
        raise ValueError("dop: give policy= or budget= (with search_data=), not both")
    if budget and not search_data:
        raise ValueError("dop: budget= needs search_data= (the validation data the search runs on)")
    if search_data and not budget:
        raise ValueError("dop: search_data= applies only together with budget=")
    if ranker and not (policy or budget):
        raise ValueError("dop: ranker= applies only together with policy= or budget=")
    if str(dtype) not in DTYPES:
        raise ValueError(f"dop: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


class DopLMM(lmms):
    """lmms-eval's simple-model interface over dop (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "demo",
        policy: str | None = None,
        ranker: str | None = None,
        budget: str | None = None,
        search_data: str | None = None,
        search_samples: int = 25,
        space: str = "dop",
        device: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        log_dir: str = DEFAULT_LOG_DIR,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__()
        _check_arguments(kwargs, policy=policy, budget=budget, search_data=search_data, ranker=ranker, dtype=dtype)
        self._place(device)
        self.pretrained = str(pretrained)
        self.seed = int(seed)
        self.batch_size_per_gpu = self._batch_size(batch_size)

        model, processor = load_model(
            self.pretrained, attn_implementation=attn_implementation, dtype=getattr(torch, str(dtype)),
            trust_remote_code=_flag(trust_remote_code),
        )
        self._model = model.to(self._device).eval()
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        # the demo's own prompt format for the demo (and its retrained exports), else the chat template
        self._build_prompt = prompt_builder_for(self.pretrained)
        self._is_demo_prompt = self._build_prompt is not chat_prompt

        self.log_dir = Path(log_dir).resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.policy = None
        self.ranker = ranker or None
        if budget:
            self.policy = self._searched_policy(str(budget), str(search_data), int(search_samples), str(space))
        elif policy:
            self.policy = Policy.from_json(policy).check_layers(num_decoder_layers(self._model))
        if self.policy is not None:
            resolve_ranker(self.ranker or self.policy.ranker)  # unknown names fail now
        self._flops_of = FlopsCache(self._model, self.policy)
        self.flops_path = self.log_dir / f"flops.rank{self.rank}.jsonl"
        self.flops_path.write_text("")
        what = "unpruned" if self.policy is None else (
            f"policy {self.policy.describe()}, ranker "
            f"{self.ranker or self.policy.ranker or 'default'}")
        logger.info(f"dop: {self.pretrained} on {self._device} (rank {self.rank} of {self.world_size}), {what}; "
                    f"per-request FLOPs in {self.flops_path}")

    # ------------------------------------------------------------------ set-up helpers
    def _place(self, device: str | None) -> None:
        """This process's rank, the world size and the device, from the launcher's variables:
        on CPU, accelerate's state stays single-process while torchrun (accelerate launch
        --multi_gpu) still starts several processes."""
        from accelerate import Accelerator  # heavy: optional, and only when lmms-eval places the model

        accelerator = Accelerator()
        self.accelerator = accelerator
        world = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
        if world > 1:
            local = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
            self._rank, self._world_size = int(os.environ.get("RANK", accelerator.process_index)), world
            self._device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @staticmethod
    def _batch_size(value) -> int:
        text = str(value).strip().lower()
        if text.startswith("auto"):
            logger.info("dop: batch_size=auto is not supported; using 1")
            return 1
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"dop: batch_size must be a positive integer, got {value!r}") from None
        if n < 1:
            raise ValueError(f"dop: batch_size must be a positive integer, got {value!r}")
        if n > 1:
            logger.info(f"dop: batch_size={n}: requests that share generation settings are padded on the "
                        f"left and generated together")
        return n

    def _searched_policy(self, budget: str, data: str, samples: int, space: str):
        """Search a policy on ``data`` under ``budget`` (cached in ``log_dir``)."""

        ranker = self.ranker or "vispruner"
        key = {"model": self.pretrained, "budget": budget, "data": data, "samples": samples,
               "space": space, "ranker": ranker, "seed": self.seed}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = self.log_dir / f"policy-{digest}.json"
        with self._rank_zero_first():  # one process searches, the others read its file
            if path.is_file():
                logger.info(f"dop: using the cached policy {path} (budget {budget}, search data {data})")
                return Policy.from_json(str(path))
            result = search(
                self._model, self.processor, load_dataset(data, limit=samples), budget=budget, space=space,
                ranker=ranker, seed=self.seed, build_prompt=self._build_prompt, progress=False,
                meta={"model": self.pretrained, "data": data},
            )
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            result.policy.to_json(str(tmp))
            os.replace(tmp, path)
            logger.info(f"dop: searched a policy for budget {budget} on {data} ({samples} samples): {path}")
            return result.policy

    @contextmanager
    def _rank_zero_first(self):
        """Rank 0 runs the block first, the other ranks after it (a barrier on each side)."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            if self.rank != 0:
                dist.barrier()
            yield
            if self.rank == 0:
                dist.barrier()
        else:
            with self.accelerator.main_process_first():
                yield

    # ------------------------------------------------------------------ lmms interface
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _prompt(self, context: str, num_images: int) -> str:
        if self._is_demo_prompt:
            if num_images != 1:
                raise ValueError(f"dop: the demo model takes one image per question, got {num_images}")
            return self._build_prompt(self.processor, context)

        return chat_prompt(self.processor, context, instruction=None, num_images=num_images)

    def _inputs(self, text: str, visuals: list) -> dict:
        images = [v.convert("RGB") for v in visuals]
        inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        return on_model(dict(inputs), next(self._model.parameters()))

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError(f"dop: {task} doc {doc_id}: only image inputs are supported (got "
                             f"{', '.join(sorted({type(v).__name__ for v in visuals}))})")
        return visuals

    def _policy_context(self):
        if self.policy is None:
            return nullcontext()
        return apply_policy(self._model, self.policy, ranker=self.ranker)

    def _log_flops(self, rows: list[dict]) -> None:
        with open(self.flops_path, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")

    def _flops_row(self, request: str, task, split, doc_id, inputs: dict) -> dict:
        input_ids = inputs["input_ids"]
        spans = get_adapter(self._model).image_spans(input_ids, inputs) if "pixel_values" in inputs else []
        counts = [span.n for span in spans]
        n_text = int(input_ids.shape[1]) - sum(counts)
        return {"request": request, "task": task, "split": split, "doc_id": doc_id,
                "visual_tokens": counts, "text_tokens": n_text,
                "flops": self._flops_of(tuple(counts), n_text)}

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="dop generate")
        torch.manual_seed(self.seed)
        with self._policy_context(), torch.inference_mode():
            for start in range(0, len(requests), self.batch_size):
                batch = requests[start:start + self.batch_size]
                out.extend(self._generate_batch(batch))
                bar.update(len(batch))
        bar.close()
        self._summarise("generate_until", len(requests))
        return out

    def _generate_batch(self, batch: list[Instance]) -> list[str]:
        """Answers of one batch of requests: the prompts that share generation settings are
        padded on the left and generated together (the pruning runtime prunes each row on its
        own, so the answers equal batch size 1's)."""

        texts: list[str | None] = [None] * len(batch)
        rows: list[dict | None] = [None] * len(batch)
        groups: dict[str, list[int]] = {}
        prepared = []
        for j, req in enumerate(batch):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs(self._prompt(context, len(visuals)), visuals)
            prepared.append(inputs)
            rows[j] = self._flops_row("generate_until", task, split, doc_id, inputs)
            groups.setdefault(json.dumps(gen_kwargs or {}, sort_keys=True, default=str), []).append(j)
        for members in groups.values():
            cfg, until = self._generation_config(batch[members[0]].args[1])
            inputs = collate([prepared[j] for j in members], pad_token_id(self._model))
            out = self._model.generate(**inputs, generation_config=cfg)
            for row, j in enumerate(members):
                new = out[row, inputs["input_ids"].shape[1]:]
                texts[j] = _cut_at_stops(self._tokenizer.decode(new, skip_special_tokens=True), until).strip()
        self._log_flops(rows)
        return texts

    def _generation_config(self, gen_kwargs: dict | None):
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if isinstance(until, str):
            until = [until]
        max_new = int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        cfg = greedy_config(self._model, max_new, self._tokenizer)
        temperature = float(kw.get("temperature") or 0.0)
        if kw.get("do_sample") or temperature > 0:
            cfg.do_sample, cfg.temperature = True, temperature if temperature > 0 else 1.0
            if kw.get("top_p") is not None:
                cfg.top_p = float(kw["top_p"])
        if kw.get("num_beams"):
            cfg.num_beams = int(kw["num_beams"])
        return cfg, until

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res, rows = [], []
        torch.manual_seed(self.seed)
        with self._policy_context(), torch.inference_mode():
            for req in tqdm(requests, disable=self.rank != 0, desc="dop loglikelihood"):
                context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                prompt = self._prompt(context, len(visuals))
                n_ctx = int(self._inputs(prompt, visuals)["input_ids"].shape[1])
                inputs = self._inputs(prompt + str(continuation), visuals)
                ids = inputs["input_ids"]
                if ids.shape[1] <= n_ctx:
                    raise ValueError(f"dop: {task} doc {doc_id}: the continuation {continuation!r} adds no token")
                logits = self._model(**inputs).logits[0, n_ctx - 1:-1].float()
                target = ids[0, n_ctx:]
                logp = torch.log_softmax(logits, dim=-1)
                total = float(logp.gather(1, target[:, None]).sum())
                greedy = bool((logits.argmax(dim=-1) == target).all())
                res.append((total, greedy))
                rows.append(self._flops_row("loglikelihood", task, split, doc_id, inputs))
        self._log_flops(rows)
        self._summarise("loglikelihood", len(requests))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "dop: generate_until_multi_round is not supported (dop prunes single-turn prefills); "
            "run single-round tasks, or the checkpoint's own lmms-eval model for multi-round ones"
        )

    def _summarise(self, request: str, n: int) -> None:
        rows = [json.loads(line) for line in self.flops_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["request"] == request]
        if not rows:
            return
        mean = {c: sum(r["flops"][c]["decoder"] for r in rows) / len(rows) for c in ("dop", "paper")}
        logger.info(f"dop: {n} {request} requests on rank {self.rank}; mean decoder FLOPs per request "
                    f"{mean['dop']:.4g} (dop), {mean['paper']:.4g} (paper); per request in {self.flops_path}")
