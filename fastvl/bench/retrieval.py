"""``fastvl bench retrieval``: retrieval evaluation throughput (scored pairs per second), fused vs
reference, and the speed-up of caching ViLBERT's text stream.

A random-weight model scores a random pool (``--texts`` captions x ``--images`` images) exactly as
``fastvl evaluate --task retrieval`` does. Variants:

* ViLBERT: ``reference`` (every op on the float64-capable reference backend, every pair through the
  whole model), ``fused`` (the default backends, every pair through the whole model) and ``fused+cache``
  (the text layers below the first co-attention once per caption, the region embeddings once per image:
  :func:`fastvl.finetune.tasks.retrieval.vilbert_pair_scores`). ``x vs fused`` of ``fused+cache`` is the
  cache's speed-up.
* ALBEF: ITC over the pool then ITM on each query's top ``k``, ``reference`` vs ``fused``.

Floors: FLOPs of one pass over the pool are counted with ``torch.utils.flop_counter`` (matmuls and
attention); bytes are the weights read once per forward chunk plus the pool's inputs, a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastvl.bench import harness


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("vilbert-tiny", "vilbert-base", "albef-tiny", "albef-base"),
                        nargs="+", default=None, help="default: the base models on GPU, the tiny ones on CPU")
    parser.add_argument("--texts", type=int, default=None, help="captions in the pool (default 50 GPU / 10 CPU)")
    parser.add_argument("--images", type=int, default=None, help="images in the pool (default 10 GPU / 4 CPU)")
    parser.add_argument("--batch", type=int, default=256, help="pairs per forward")
    parser.add_argument("--k-test", type=int, default=16, help="ALBEF: ITM candidates per query")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")


def _vilbert_pool(model, texts: int, images: int, device, dtype, generator):
    c = model.config
    length, regions = 30, 37
    text = {"input_ids": torch.randint(c.vocab_size, (texts, length), generator=generator).to(device),
            "token_type_ids": torch.zeros(texts, length, dtype=torch.long, device=device),
            "text_mask": (torch.arange(length)[None] < torch.randint(8, length + 1, (texts, 1), generator=generator)
                          ).to(device)}
    corners = torch.rand(images, regions, 2, 2, generator=generator).sort(dim=2).values
    loc = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)
    area = (loc[..., 2] - loc[..., 0]) * (loc[..., 3] - loc[..., 1])
    image = {"region_feats": torch.randn(images, regions, c.v_feature_size, generator=generator).to(device, dtype),
             "region_loc": torch.cat([loc, area[..., None]], dim=-1).to(device, dtype),
             "region_mask": torch.ones(images, regions, dtype=torch.bool, device=device)}
    return text, image


def _counted_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_vilbert(results: harness.Results, name: str, texts: int, images: int, batch: int, dtype, device) -> None:
    from fastvl.finetune.tasks.retrieval import vilbert_pair_scores, vilbert_pair_scores_uncached
    from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForTasks

    torch.manual_seed(0)
    config = ViLBERTConfig.named(name.removeprefix("vilbert-"))
    pairs = [(t, i) for t in range(texts) for i in range(images)]
    generator = torch.Generator().manual_seed(0)
    for variant in ("reference", "fused", "fused+cache"):
        model = ViLBERTForTasks(config, num_labels=2, backend="reference" if variant == "reference" else None)
        model = model.to(device, dtype).eval()
        text, image = _vilbert_pool(model, texts, images, device, dtype, generator=torch.Generator().manual_seed(0))
        scorer = vilbert_pair_scores if variant == "fused+cache" else vilbert_pair_scores_uncached

        def score(model=model, text=text, image=image, scorer=scorer):
            with torch.no_grad():
                return scorer(model, text, image, pairs, True, batch)

        flops = _counted_flops(score)
        chunks = -(-len(pairs) // batch)
        nbytes = _weight_bytes(model) * chunks + sum(v.numel() * v.element_size() for v in [*text.values(),
                                                                                           *image.values()])
        row = results.measure(score, name=f"{name} retrieval", variant=variant, dtype=dtype, flops=flops,
                              nbytes=nbytes, memory=False,
                              params={"texts": texts, "images": images, "pairs": len(pairs), "batch": batch})
        row["pairs_per_s"] = len(pairs) / (row["median_ms"] * 1e-3)
    del generator


def run_albef(results: harness.Results, name: str, texts: int, images: int, batch: int, k: int, dtype,
              device) -> None:
    from fastvl.dispatch import use_backend
    from fastvl.finetune.tasks.retrieval import albef_features, albef_rerank
    from fastvl.models.albef import ALBEF, ALBEFConfig

    torch.manual_seed(0)
    model = ALBEF(ALBEFConfig.named(name.removeprefix("albef-")), with_mlm_head=False).to(device, dtype).eval()
    c = model.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, c.image_res, c.image_res, generator=generator).to(device, dtype)
    ids = torch.randint(3, c.vocab_size, (texts, 25), generator=generator).to(device)
    ids[:, 0] = c.cls_token_id
    text = {"input_ids": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool)}

    def score():
        with torch.no_grad():
            image_embeds, image_feats, text_embeds, text_feats, mask = albef_features(model, pixels, text, batch)
            similarity = (image_feats @ text_feats.t()).float()
            i2t = albef_rerank(model, image_embeds, text_embeds, mask, similarity, list(range(images)), k, True, batch)
            t2i = albef_rerank(model, image_embeds, text_embeds, mask, similarity.t(), list(range(texts)), k, False,
                               batch)
            return i2t, t2i

    pairs = min(k, texts) * images + min(k, images) * texts
    for variant in ("reference", "fused"):
        scope = use_backend("reference") if variant == "reference" else contextlib.nullcontext()
        with scope:
            flops = _counted_flops(score)
            row = results.measure(score, name=f"{name} retrieval", variant=variant, dtype=dtype, flops=flops,
                                  nbytes=_weight_bytes(model) + pixels.numel() * pixels.element_size(), memory=False,
                                  params={"texts": texts, "images": images, "itm_pairs": pairs, "k": k})
        row["pairs_per_s"] = pairs / (row["median_ms"] * 1e-3)


def run(args: argparse.Namespace, device: torch.device, out_dir: Path) -> int:
    gpu = device.type == "cuda"
    models = args.model or (["vilbert-base", "albef-base"] if gpu else ["vilbert-tiny", "albef-tiny"])
    texts = args.texts or (50 if gpu else 10)
    images = args.images or (10 if gpu else 4)
    if args.quick:
        texts, images = min(texts, 6), min(images, 3)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.precision or ("bf16" if gpu else "fp32")]
    results = harness.Results("retrieval", device, quick=args.quick, note=args.note)
    for name in models:
        if name.startswith("vilbert"):
            run_vilbert(results, name, texts, images, args.batch, dtype, device)
        else:
            run_albef(results, name, texts, images, args.batch, args.k_test, dtype, device)
    print(f"\n== retrieval on {results.env['device']} ==")
    print(results.table(["reference", "fused"]))
    for row in results.rows:
        print(f"{row['name']} {row['variant']}: {row['pairs_per_s']:.1f} pairs/s")
    print(f"wrote {results.save(out_dir / 'retrieval.json', ['reference', 'fused'])}")
    return 0
