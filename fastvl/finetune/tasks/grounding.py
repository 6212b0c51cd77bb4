"""ALBEF's weakly supervised visual grounding on RefCOCO+ (no box supervision), as ``Grounding.py``.

**Training** (or none: ``fastvl evaluate`` takes a pretraining checkpoint too, zero-shot, with its
pretrained ITM head): the expressions as captions of their images, ITC + ITM with ALBEF's retrieval objective
(:class:`~fastvl.finetune.tasks.albef_retrieval.ALBEFRetrieval`; every expression of an image is a
positive of it), as ALBEF fine-tunes its grounding model. No box is read.

**Evaluation** (:func:`gradcam_maps`, ALBEF's ``gradcam_mode='itm'``): the ITM positive logit of
(image, expression) is back-propagated to the cross-attention probabilities of text-encoder layer
``block`` (ALBEF's numbering over all text-encoder layers: 8, the third of its six fusion layers;
``--gradcam-block``; default ``min(8, last layer)``). With ``probs`` and ``grad`` ``[B, heads, Lt,
1 + patches]``, the image [CLS] column dropped: ``cam = probs * relu(grad)`` on real text tokens,
averaged over heads and then over the text positions (ALBEF divides by the padded length; a per
example constant, it never changes a ranking), as a ``[grid, grid]`` map over the patches.

**ALBEF_itc** (``--gradcam itc``, :func:`itc_gradcam_maps`, ALBEF's ``gradcam_mode='itc'``): the
image-text similarity ``s = <image_feat, text_feat> / temp`` (the ITC score, no fusion) is
back-propagated to the self-attention probabilities of image-encoder block ``block``
(``--gradcam-block``; default the last block, our reading of the paper's ALBEF_itc, where
``Grounding.py`` takes ``--block_num`` in both modes); the [CLS] query's row over the patches,
``probs * relu(grad)`` averaged over heads, is the map. The ITC score sees the text only through its
[CLS] vector.

**Ranking** (:func:`rank_boxes`, ALBEF's ``grounding_eval``): the map is resized bicubically to the
image's original ``height x width``; each proposal ``[x, y, w, h]`` scores the map's sum over rows
``int(y) .. int(y + h)`` and columns ``int(x) .. int(x + w)`` divided by ``(w h) ** 0.5``; the best
proposal is the prediction and it is right when the REFER IoU (:func:`fastvl.finetune.metrics.
refer_iou`) with the referred box is >= 0.5. Two differences where ALBEF's loop is undefined: a
proposal of zero area is never chosen (ALBEF's score would be NaN), and when no score is positive the
best one is still taken (ALBEF keeps the previous expression's box); slices start at 0 at least.

Reported with the accuracy: ``upper_bound`` (a proposal reaches 0.5), ``random_proposal_accuracy``
(the expected accuracy of a random proposal) and ``largest_proposal_accuracy`` (what a uniform map
picks: its score is ``sqrt(w h)``). ``attention_maps``: a folder where evaluation draws the first
``num_maps`` examples as PNG (the image | the map over it, the referred box green, the prediction red).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from fastvl.data.format import DataError
from fastvl.data.refer import read_proposals, read_refcoco_split
from fastvl.data.tasks import ImageLookup
from fastvl.finetune import metrics
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import albef_step_inputs, num_tokens, pixel_batch, text_batch, tokenize

ALBEF_BLOCK = 8
THRESHOLD = 0.5


GRADCAM_MODES = ("itm", "itc")


def default_block(config, mode: str = "itm") -> int:
    """ITM: text-encoder layer ``min(8, last)``; ITC: the image encoder's last block."""
    return min(ALBEF_BLOCK, config.num_hidden_layers - 1) if mode == "itm" else config.vision_depth - 1


def check_block(config, block: int, mode: str = "itm") -> int:
    if mode not in GRADCAM_MODES:
        raise ValueError(f"--gradcam must be one of {GRADCAM_MODES}, got {mode!r}")
    if mode == "itc":
        if not 0 <= block < config.vision_depth:
            raise ValueError(f"--gradcam-block must be an image-encoder block with --gradcam itc, in [0, "
                             f"{config.vision_depth - 1}] for this model, got {block}")
    elif not config.fusion_layer <= block < config.num_hidden_layers:
        raise ValueError(f"--gradcam-block must be a fusion layer of the text encoder, in [{config.fusion_layer}, "
                         f"{config.num_hidden_layers - 1}] for this model, got {block}")
    return block


def _square(patches: int) -> int:
    grid = int(round(patches ** 0.5))
    if grid * grid != patches:
        raise ValueError(f"the image tokens after [CLS] ({patches}) are not a square grid of patches")
    return grid


def gradcam_from(probs: torch.Tensor, grads: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """ALBEF's Grad-CAM ``[B, grid, grid]`` from cross-attention probabilities and their gradients
    ``[B, heads, Lt, 1 + grid * grid]`` and the text mask ``[B, Lt]``."""
    grid = _square(probs.shape[-1] - 1)
    mask = text_mask.to(probs.dtype)[:, None, :, None]
    cam = probs[..., 1:] * mask * grads[..., 1:].clamp(min=0) * mask
    return cam.mean(dim=1).mean(dim=1).reshape(-1, grid, grid)


def gradcam_maps(model, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps [B, grid, grid], itm_scores [B])``: Grad-CAM of the ITM positive logit on the
    cross-attention of text-encoder layer ``block`` (see the module docstring). The gradient is taken
    with :func:`torch.autograd.grad` (no parameter's ``.grad`` changes); the image tokens are detached
    (nothing flows into the ViT)."""
    c = model.config
    check_block(c, block)
    with torch.enable_grad():
        image_embeds, _ = model.image_features(images)
        image_embeds = image_embeds.detach().requires_grad_(True)
        text = model.text_encoder.encode_text(input_ids, text_mask)
        fused, probabilities = model.text_encoder.fuse(text, text_mask, image_embeds, output_attentions=True)
        cross = probabilities[block - c.fusion_layer][1]
        score = model.itm_head(fused[:, 0])[:, 1]
        (grad,) = torch.autograd.grad(score.sum(), cross)
    return gradcam_from(cross.detach().float(), grad.float(), text_mask), score.detach().float()


def itc_gradcam_from(probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """ALBEF_itc's Grad-CAM ``[B, grid, grid]`` from image self-attention probabilities and their
    gradients ``[B, heads, 1 + grid * grid, 1 + grid * grid]``: the [CLS] query's row over the patches."""
    grid = _square(probs.shape[-1] - 1)
    return (probs[:, :, 0, 1:] * grads[:, :, 0, 1:].clamp(min=0)).mean(dim=1).reshape(-1, grid, grid)


def itc_gradcam_maps(model, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                     block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps [B, grid, grid], itc_scores [B])``: Grad-CAM of each (image, expression) pair's ITC
    similarity on the self-attention of image-encoder block ``block`` (ALBEF_itc; see the module
    docstring). No parameter's ``.grad`` changes; the text side carries no gradient."""
    check_block(model.config, block, "itc")
    proj = model.vision_proj
    with torch.no_grad():
        _, text_feat = model.text_features(input_ids, text_mask)
    with torch.enable_grad():
        tokens, probabilities = model.visual_encoder(images.to(proj.weight.dtype), return_attention=True)
        image_feat = F.normalize(proj(tokens[:, 0]), dim=-1)
        score = (image_feat * text_feat.to(image_feat.dtype)).sum(dim=-1) / model.temp
        (grad,) = torch.autograd.grad(score.sum(), probabilities[block])
    return itc_gradcam_from(probabilities[block].detach().float(), grad.float()), score.detach().float()


def upsample_map(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[grid, grid]`` map resized bicubically to ``[height, width]`` (ALBEF's ``F.interpolate``)."""
    return F.interpolate(cam[None, None].double(), size=(int(height), int(width)), mode="bicubic")[0, 0]


def box_sums(mask: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
    """The sum of ``mask [H, W]`` over each ``[x, y, w, h]`` box's rows ``int(y) .. int(y + h)`` and
    columns ``int(x) .. int(x + w)`` (end excluded, clipped to the map), by an integral image."""
    height, width = mask.shape
    integral = F.pad(mask.double().cumsum(0).cumsum(1), (1, 0, 1, 0)).numpy()
    b = np.asarray(boxes, np.float64)
    x1 = np.clip(b[:, 0].astype(np.int64), 0, width)
    y1 = np.clip(b[:, 1].astype(np.int64), 0, height)
    x2 = np.clip((b[:, 0] + b[:, 2]).astype(np.int64), 0, width)
    y2 = np.clip((b[:, 1] + b[:, 3]).astype(np.int64), 0, height)
    x2, y2 = np.maximum(x2, x1), np.maximum(y2, y1)
    return integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]


def rank_boxes(cam: torch.Tensor, boxes: np.ndarray, height: int, width: int, alpha: float = 0.5) -> np.ndarray:
    """ALBEF's proposal scores: the resized map's sum inside each ``[x, y, w, h]`` box / area ** alpha
    (zero-area boxes -inf)."""
    sums = box_sums(upsample_map(cam, height, width), boxes)
    area = np.asarray(boxes, np.float64)[:, 2] * np.asarray(boxes, np.float64)[:, 3]
    return np.where(area > 0, sums / np.where(area > 0, area, 1.0) ** alpha, -np.inf)


class GroundingTask(Task):
    name = "grounding"
    families = ("albef",)
    objectives = ("itc", "itm")
    metric = "accuracy"
    has_step_inputs = True
    supports_zero_shot = True  # ALBEF's pretrained ITM head grounds without fine-tuning
    options = ("trust_pickle", "gradcam", "gradcam_block", "attention_maps", "num_maps")

    def __init__(self, task_dir, family, dataset, special, *, state=None, trust_pickle: bool = False,
                 gradcam: str | None = None, gradcam_block: int | None = None, attention_maps: str | None = None,
                 num_maps: int = 8, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        dataset.require_pixels("ALBEF grounding")
        self.trust_pickle, self.attention_maps, self.num_maps = trust_pickle, attention_maps, num_maps
        state = state or {}
        self.gradcam = gradcam if gradcam is not None else state.get("gradcam", "itm")
        if self.gradcam not in GRADCAM_MODES:
            raise ValueError(f"--gradcam must be one of {GRADCAM_MODES}, got {self.gradcam!r}")
        self.gradcam_block = gradcam_block if gradcam_block is not None else state.get("gradcam_block")
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}

    def state(self) -> dict:
        state = {"gradcam": self.gradcam}
        return state if self.gradcam_block is None else {**state, "gradcam_block": self.gradcam_block}

    def split(self, name: str):
        """``(expressions, image index per expression, word pieces, proposals or None)`` (read once)."""
        if name not in self._splits:
            files = self.task_dir.split(name)
            expressions = read_refcoco_split(files, name, self.trust_pickle)
            where = files["refs"]
            images = [self.lookup(e.image_id, f"{where}: sent_id {e.sent_id}") for e in expressions]
            pieces = tokenize(self.dataset.tokenizer, [e.text for e in expressions], self.family)
            proposals = read_proposals(files["proposals"]) if "proposals" in files else None
            if proposals is not None:
                missing = sorted({e.image_id for e in expressions} - set(proposals))
                if missing:
                    raise DataError(f"{files['proposals']}: no proposals for image {missing[0]} (of {where})")
            self._splits[name] = (expressions, images, pieces, proposals)
        return self._splits[name]

    def make_model(self, config) -> torch.nn.Module:
        from fastvl.finetune.tasks.albef_retrieval import ALBEFRetrieval

        if self.gradcam_block is not None:
            check_block(config, self.gradcam_block, self.gradcam)
        return ALBEFRetrieval(config)

    def num_train(self) -> int:
        return len(self.split("train")[0])

    def collate(self, keys) -> dict:
        _, images, pieces, _ = self.split("train")
        chosen = [int(index) for _, index in keys]
        batch = text_batch([pieces[i] for i in chosen], self.special, self.family, self.max_text_len)
        batch["images"] = pixel_batch(self.dataset, [images[i] for i in chosen])
        batch["image_ids"] = torch.tensor([images[i] for i in chosen], dtype=torch.long)
        batch["num_tokens"] = num_tokens(batch)
        return batch

    def step_inputs(self, micro, sampler) -> dict:
        return albef_step_inputs(micro, sampler)

    def loss(self, model, batch):
        out = model(batch["images"], batch["input_ids"], batch["text_mask"], batch["image_ids"],
                    alpha_scale=batch.get("alpha_scale", 1.0), first_micro_step=batch.get("first_micro_step", True),
                    last_micro_step=batch.get("last_micro_step", True))
        return out.loss, {"itc": out.losses["itc"], "itm": out.losses["itm"]}

    def evaluate(self, model, split, ctx):
        expressions, images, pieces, proposals = self.split(split)
        if proposals is None:
            raise DataError(f"split {split!r} of {self.task_dir.root} has no 'proposals' file: grounding ranks "
                            "detected boxes")
        block = self.gradcam_block if self.gradcam_block is not None else default_block(model.config, self.gradcam)
        maps_of = gradcam_maps if self.gradcam == "itm" else itc_gradcam_maps
        indices, real = share(len(expressions), ctx.rank, ctx.world)
        rows, drawn = [], 0
        for chunk in batches(indices, ctx.batch_size):
            batch = ctx.to_device(text_batch([pieces[i] for i in chunk], self.special, self.family, self.max_text_len))
            pixels = ctx.to_device({"images": pixel_batch(self.dataset, [images[i] for i in chunk])})["images"]
            maps, _ = maps_of(model, pixels, batch["input_ids"], batch["text_mask"], block)
            for i, cam in zip(chunk, maps.cpu()):
                e = expressions[i]
                boxes = proposals[e.image_id]
                scores = rank_boxes(cam, boxes, e.image_h, e.image_w)
                pick = int(np.argmax(scores))
                ious = np.array([metrics.refer_iou(e.box, b) for b in boxes])
                area = boxes[:, 2] * boxes[:, 3]
                rows.append(([float(v) for v in boxes[pick]], float(ious[pick]), bool((ious >= THRESHOLD).any()),
                             float((ious >= THRESHOLD).mean()), float(ious[int(np.argmax(area))])))
                if self.attention_maps and ctx.rank == 0 and drawn < self.num_maps and len(rows) <= real:
                    draw_map(os.path.join(self.attention_maps, f"{split}-{e.sent_id}.png"),
                             self.dataset[images[i]].pixels, cam, e, boxes[pick])
                    drawn += 1
        mine = [(expressions[i].sent_id, expressions[i].ref_id, *row) for i, row in zip(indices[:real], rows[:real])]
        everything = gather(mine, ctx)
        if not everything:
            raise DataError("no referring expressions to score")
        out = {"accuracy": metrics.accuracy_at_iou([r[3] for r in everything], THRESHOLD),
               "upper_bound": 100.0 * float(np.mean([r[4] for r in everything])),
               "random_proposal_accuracy": 100.0 * float(np.mean([r[5] for r in everything])),
               "largest_proposal_accuracy": metrics.accuracy_at_iou([r[6] for r in everything], THRESHOLD),
               "expressions": len(everything), "gradcam": self.gradcam, "gradcam_block": block}
        out["best_trivial_accuracy"] = max(out["random_proposal_accuracy"], out["largest_proposal_accuracy"])
        return out, {"results": [{"sent_id": r[0], "ref_id": r[1], "box": r[2], "iou": r[3]} for r in everything]}


def draw_map(path: str, pixels: np.ndarray, cam: torch.Tensor, expression, predicted) -> None:
    """A PNG of the image and, beside it, the Grad-CAM map over it (normalised to its maximum) with the
    referred box (green) and the predicted one (red), the expression as the file's text chunk."""
    from PIL import Image, ImageDraw, PngImagePlugin

    image = np.asarray(pixels, np.uint8)
    size = image.shape[0]
    scale = max(1, 256 // size)
    heat = upsample_map(cam, size, size).clamp(min=0).numpy()
    heat = heat / heat.max() if heat.max() > 0 else heat
    overlay = image.astype(np.float64) * 0.4
    overlay[..., 0] += 153.0 * heat
    overlay[..., 1] += 60.0 * heat
    panel = np.concatenate([image, overlay.clip(0, 255).astype(np.uint8)], axis=1)
    picture = Image.fromarray(panel).resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    sx, sy = size * scale / expression.image_w, size * scale / expression.image_h
    for box, colour in ((expression.box, (0, 255, 0)), (predicted, (255, 0, 0))):
        x, y, w, h = box
        left = size * scale + x * sx  # on the map panel
        draw.rectangle([left, y * sy, left + max(w * sx - 1, 0), y * sy + max(h * sy - 1, 0)], outline=colour)
    info = PngImagePlugin.PngInfo()
    info.add_text("expression", expression.text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path, pnginfo=info)
