"""Caption-based image retrieval: fine-tuned and zero-shot, evaluated as the originals do.

**Evaluation** (:meth:`RetrievalTask.evaluate`): image -> text and text -> image R@1/5/10 and their
means over the whole pool of the split (every image with all its captions; ties count against the
query), with the pool size and the time per query.

* ViLBERT scores every (caption, image) pair: ``vil_logit`` of the fused vector (fine-tuned), or
  zero-shot the pretraining alignment head (``logit[aligned] - logit[not aligned]``, the order of
  ViLBERT's softmax). The text stream's layers below the first co-attention layer depend on the caption
  only: :func:`vilbert_text_prefix` runs them once per caption, the region embeddings (and any visual
  layers below the first co-attention) once per image, and :func:`vilbert_pair_scores` runs the rest per
  pair (:func:`vilbert_pair_scores_uncached` is the plain forward, the parity reference). Each rank
  scores its share of the captions against every image.
* ALBEF ranks by ITC similarity (normalised projections), then re-scores each query's top ``k_test``
  candidates with the ITM head (positive logit); the others keep -100, as ALBEF's evaluation. Every
  rank computes all features, and re-ranks its share of the queries (ALBEF's split).

**Fine-tuning** (:meth:`RetrievalTask.loss`):

* ViLBERT: 4-way multiple choice per caption, as vilbert-multi-task's retrieval dataset: (caption,
  image), (caption, a random other image), (a random other image's caption, image), (the caption of a
  hard-negative image, image); softmax cross-entropy over the four ``vil_logit`` scores, the right one
  first. The hard-negative image is drawn from the image's row of a hard pool: by default the 20
  training images nearest to it by cosine similarity of the mean region feature (a proxy, fastvl's);
  with a ``hard_negatives`` file in the train split of ``task.json``, the pool the original reads
  (vilbert-multi-task's ``hard_negative.pkl``, mined with a trained model: ``train_image_list``, the
  training image ids, and ``train_hard_pool [images, K]``, indices into that list, column 0 the image
  itself and never drawn), see :func:`read_hard_negatives`. From a pretraining checkpoint
  ``vil_logit`` starts as the zero-shot score (:meth:`RetrievalTask.init_state`; the original starts
  it random), so fine-tuning starts from the zero-shot ranking.
* ALBEF: ITC + ITM with in-batch hard negatives, momentum distillation and queues, as ALBEF's retrieval
  model (:class:`fastvl.finetune.tasks.albef_retrieval.ALBEFRetrieval`): each sample carries its image's
  index, every caption of the same image (in the micro-batch and in the queue) is an ITC positive, with
  the targets spread evenly over them, and never an ITM hard negative.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from fastvl import _checks
from fastvl.data.tasks import ImageLookup, read_json, read_npz, read_retrieval
from fastvl.finetune import metrics
from fastvl.finetune.parallel import batches, gather, share
from fastvl.finetune.tasks import Task
from fastvl.finetune.tasks.common import albef_step_inputs, image_batch, num_tokens, region_batch, text_batch, tokenize

HARD_POOL = 20
IGNORE = -100
HARD_NEGATIVE_KEYS = ("train_image_list", "train_hard_pool")


def read_hard_negatives(path: str, train_images: list[str], *, trust_pickle: bool = False) -> np.ndarray:
    """A mined hard-negative pool as ``[len(train_images), K - 1]`` indices into ``train_images`` (the
    keys of the training split's images, in its order): column 0 of the file's pool (the image itself in
    the original's files) is dropped, as the original never draws it.

    ``path``: ``.json`` (``{"train_image_list": [ids], "train_hard_pool": [[index, ...], ...]}``), ``.npz``
    (the two arrays, read with ``allow_pickle=False``) or the original's ``.pkl`` (the same dict; full
    unpickling, only with ``trust_pickle``). Ids match the split's image keys as strings (Flickr30k's
    ints, ``1000092795`` = ``1000092795.jpg``); every training image must have a row, every index must
    be in range and no row may name the image itself after column 0."""
    from fastvl.data.format import DataError

    if path.endswith(".json"):
        data = read_json(path)
    elif path.endswith(".npz"):
        data = read_npz(path)
    elif path.endswith(".pkl"):
        if not trust_pickle:
            raise DataError(f"{path}: a pickle file can run code when loaded; convert it to .json / .npz "
                            "(train_image_list, train_hard_pool), or pass --trust-pickle if you trust it")
        import pickle

        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except Exception as error:  # a damaged pickle raises anything
            raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from error
    else:
        raise DataError(f"{path}: hard negatives must be .json, .npz or (with --trust-pickle) .pkl")
    if not isinstance(data, dict) or any(k not in data for k in HARD_NEGATIVE_KEYS):
        raise DataError(f"{path}: expected {{{', '.join(HARD_NEGATIVE_KEYS)}}} (vilbert-multi-task's "
                        f"hard_negative layout), got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    ids = [str(i) for i in np.asarray(data["train_image_list"]).reshape(-1).tolist()]
    try:
        pool = np.asarray(data["train_hard_pool"], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: train_hard_pool must be an integer matrix [images, K] ({error})") from error
    if pool.ndim != 2 or pool.shape[0] != len(ids) or pool.shape[1] < 2:
        raise DataError(f"{path}: train_hard_pool must be [len(train_image_list) = {len(ids)}, K >= 2], "
                        f"got {list(pool.shape)}")
    if pool.size and (pool.min() < 0 or pool.max() >= len(ids)):
        raise DataError(f"{path}: train_hard_pool indices must be in [0, {len(ids)}), got {pool.min()} .. {pool.max()}")
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    missing = [key for key in train_images if key not in row_of]
    if missing:
        raise DataError(f"{path}: {len(missing)} training images have no hard-negative row, e.g. {missing[0]!r}")
    position = {key: index for index, key in enumerate(train_images)}
    out = np.empty((len(train_images), pool.shape[1] - 1), dtype=np.int64)
    for index, key in enumerate(train_images):
        named = [ids[j] for j in pool[row_of[key], 1:]]
        if key in named or any(n not in position for n in named):
            bad = key if key in named else next(n for n in named if n not in position)
            raise DataError(f"{path}: the hard negatives of image {key!r} name "
                            + ("the image itself" if bad == key else f"{bad!r}, which is not a training image"))
        out[index] = [position[n] for n in named]
    return out


# ViLBERT pair scoring ------------------------------------------------------------------------------


def _scope(model):
    import contextlib

    from fastvl.dispatch import use_backend

    backend = getattr(model, "backend", None)
    return use_backend(backend) if backend is not None else contextlib.nullcontext()


def vilbert_text_prefix(bert, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, text_mask: torch.Tensor,
                        task_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [B, Lt, H], bool mask)`` of captions after the text layers below the first
    co-attention layer (the part of the text stream no image reaches); with task tokens
    (``task_ids [B, 1]``) the token is spliced in after [CLS] as the encoder does (``Lt + 1``)."""
    c = bert.config
    if not c.with_coattention:
        raise ValueError("cached-text retrieval needs co-attention")
    if c.task_specific_tokens and task_ids is None:
        raise ValueError("task_ids [B, 1] is required: the config has task_specific_tokens")
    with _scope(bert):
        mask = _checks.key_padding_mask("text_mask", text_mask, *input_ids.shape, input_ids.device)
        inserted = None
        if c.task_specific_tokens:
            inserted = bert.task_embeddings(task_ids.view(input_ids.shape[0], -1))
            mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
        hidden = bert.embeddings(input_ids, token_type_ids, insert_after_first=inserted)
        for index in range(c.t_biattention_id[0]):
            hidden = bert.layer[index](hidden, mask)
    return hidden, mask


def vilbert_image_prefix(bert, region_feats: torch.Tensor, region_loc: torch.Tensor,
                         region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [B, Lv, Hv], bool mask)`` of images after the region embeddings and the visual layers
    below the first co-attention layer (none in the released configurations)."""
    c = bert.config
    with _scope(bert):
        mask = _checks.key_padding_mask("region_mask", region_mask, *region_feats.shape[:2], region_feats.device)
        hidden = bert.v_embeddings(region_feats, region_loc)
        for index in range(c.v_biattention_id[0]):
            hidden = bert.v_layer[index](hidden, mask)
    return hidden, mask


def vilbert_fused(bert, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                  region_mask: torch.Tensor) -> torch.Tensor:
    """The fused vector of pairs from their prefixes (:func:`vilbert_text_prefix`,
    :func:`vilbert_image_prefix`): the rest of ViLBERT's encoder in its order, then the poolers."""
    from fastvl.models.vilbert import fuse

    c = bert.config
    with _scope(bert):
        t_start, v_start = c.t_biattention_id[0], c.v_biattention_id[0]
        for count, (v_end, t_end) in enumerate(zip(c.v_biattention_id, c.t_biattention_id)):
            for index in range(t_start, t_end):
                text = bert.layer[index](text, text_mask)
            for index in range(v_start, v_end):
                image = bert.v_layer[index](image, region_mask)
            out = bert.c_layer[count](image, region_mask, text, text_mask)
            image, text = out[0], out[1]
            v_start, t_start = v_end, t_end
        for index in range(v_start, len(bert.v_layer)):
            image = bert.v_layer[index](image, region_mask)
        for index in range(t_start, len(bert.layer)):
            text = bert.layer[index](text, text_mask)
        return fuse(c, F.relu(bert.t_pooler(text[:, 0])), F.relu(bert.v_pooler(image[:, 0])))


def vilbert_head_score(model, fused: torch.Tensor, zero_shot: bool) -> torch.Tensor:
    """Pair scores ``[N]``: ``vil_logit`` (fine-tuned) or the alignment head's aligned-minus-not margin."""
    if zero_shot:
        logits = model.cls.bi_seq_relationship(fused)
        return logits[:, 0] - logits[:, 1]
    return model.vil_logit(fused)[:, 0]


@torch.no_grad()
def vilbert_pair_scores(model, text: dict, images: dict, pairs: list[tuple[int, int]], zero_shot: bool,
                        batch_size: int = 256) -> torch.Tensor:
    """Scores ``[len(pairs)]`` of (text index, image index) pairs with the caption and image prefixes
    computed once each (``text``: input_ids / token_type_ids / text_mask ``[T, Lt]``; ``images``:
    region_feats / region_loc / region_mask ``[I, Lv, ...]``)."""
    bert = model.bert
    needed_t = sorted({t for t, _ in pairs})
    needed_i = sorted({i for _, i in pairs})
    task_id = getattr(model, "task_id", None)  # a multi-task model's task token (fastvl.finetune.multitask)
    task_ids = None if task_id is None else torch.full((len(needed_t), 1), task_id, device=text["input_ids"].device)
    text_states, text_masks = vilbert_text_prefix(bert, text["input_ids"][needed_t], text["token_type_ids"][needed_t],
                                                  text["text_mask"][needed_t], task_ids)
    image_states, image_masks = vilbert_image_prefix(bert, images["region_feats"][needed_i],
                                                     images["region_loc"][needed_i], images["region_mask"][needed_i])
    row_t = {t: r for r, t in enumerate(needed_t)}
    row_i = {i: r for r, i in enumerate(needed_i)}
    scores = []
    for chunk in batches(list(range(len(pairs))), batch_size):
        ts = torch.tensor([row_t[pairs[p][0]] for p in chunk], device=text_states.device)
        is_ = torch.tensor([row_i[pairs[p][1]] for p in chunk], device=text_states.device)
        fused = vilbert_fused(bert, text_states[ts], text_masks[ts], image_states[is_], image_masks[is_])
        scores.append(vilbert_head_score(model, fused, zero_shot).float())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def vilbert_pair_scores_uncached(model, text: dict, images: dict, pairs: list[tuple[int, int]], zero_shot: bool,
                                 batch_size: int = 256) -> torch.Tensor:
    """The same scores by the plain forward of every pair (the parity reference for the cache)."""
    scores = []
    for chunk in batches(pairs, batch_size):
        ts, is_ = [t for t, _ in chunk], [i for _, i in chunk]
        out = model(text["input_ids"][ts], text["token_type_ids"][ts], text["text_mask"][ts],
                    images["region_feats"][is_], images["region_loc"][is_], images["region_mask"][is_])
        if zero_shot:
            scores.append((out.alignment_scores[:, 0] - out.alignment_scores[:, 1]).float())
        else:
            scores.append(out.option_score[:, 0].float())
    return torch.cat(scores) if scores else torch.empty(0)


# ALBEF ITC + ITM re-ranking -------------------------------------------------------------------------


@torch.no_grad()
def albef_features(model, images: torch.Tensor, text: dict, batch_size: int = 256):
    """``(image tokens, image feats, text states, text feats, text mask)`` of a whole pool."""
    image_embeds, image_feats, text_embeds, text_feats = [], [], [], []
    for chunk in batches(list(range(images.shape[0])), batch_size):
        tokens, feats = model.image_features(images[chunk])
        image_embeds.append(tokens)
        image_feats.append(feats)
    mask = text["text_mask"]
    for chunk in batches(list(range(text["input_ids"].shape[0])), batch_size):
        states, feats = model.text_features(text["input_ids"][chunk], mask[chunk])
        text_embeds.append(states)
        text_feats.append(feats)
    return torch.cat(image_embeds), torch.cat(image_feats), torch.cat(text_embeds), torch.cat(text_feats), mask


@torch.no_grad()
def albef_itm_scores(model, image_embeds, text_embeds, text_mask, pairs: list[tuple[int, int]],
                     batch_size: int = 128) -> torch.Tensor:
    """ITM positive logits ``[len(pairs)]`` of (image index, text index) pairs."""
    scores = []
    for chunk in batches(pairs, batch_size):
        ii = torch.tensor([i for i, _ in chunk], device=image_embeds.device)
        ti = torch.tensor([t for _, t in chunk], device=image_embeds.device)
        fused = model.text_encoder.fuse(text_embeds[ti], text_mask[ti], image_embeds[ii])
        scores.append(model.itm_head(fused[:, 0])[:, 1].float())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def albef_rerank(model, image_embeds, text_embeds, text_mask, similarity: torch.Tensor, queries: list[int],
                 k: int, images_are_queries: bool, batch_size: int = 128) -> torch.Tensor:
    """Rows of the score matrix for ``queries`` (rows of ``similarity [Q, C]``): the ITM score of each
    query's top ``k`` candidates by similarity, -100 elsewhere."""
    rows = torch.full((len(queries), similarity.shape[1]), float(IGNORE))
    if not queries:
        return rows
    top = similarity[queries].topk(min(k, similarity.shape[1]), dim=1).indices.cpu()
    pairs = [(q, int(c)) if images_are_queries else (int(c), q) for q, cands in zip(queries, top) for c in cands]
    scores = albef_itm_scores(model, image_embeds, text_embeds, text_mask, pairs, batch_size).cpu()
    rows.scatter_(1, top, scores.view(len(queries), -1))
    return rows


# the task -------------------------------------------------------------------------------------------


class RetrievalTask(Task):
    name = "retrieval"
    families = ("vilbert", "albef")
    metric = "r_mean"
    supports_zero_shot = True
    options = ("trust_pickle",)  # task options the command line passes through

    def __init__(self, task_dir, family, dataset, special, *, state=None, k_test: int = 128,
                 trust_pickle: bool = False, **kwargs):
        super().__init__(task_dir, family, dataset, special, **kwargs)
        self.trust_pickle = trust_pickle
        self.objectives = ("ce",) if family == "vilbert" else ("itc", "itm")
        self.has_step_inputs = family == "albef"
        self.k_test = k_test
        self.lookup = ImageLookup(dataset.image_ids, dataset.dir)
        self._splits: dict = {}
        self._hard_pool: np.ndarray | None = None

    def state(self) -> dict:
        return {"head": "vil_logit" if self.family == "vilbert" else "itm"}

    def split(self, name: str):
        """``(RetrievalSplit, dataset index of every image, caption word pieces)`` (read once)."""
        if name not in self._splits:
            pool = read_retrieval(self.task_dir.split(name), name)
            images = [self.lookup(key, f"{pool.source}: image {key!r}") for key in pool.images]
            pieces = tokenize(self.dataset.tokenizer, list(pool.texts), self.family)
            self._splits[name] = (pool, images, pieces)
        return self._splits[name]

    def make_model(self, config) -> torch.nn.Module:
        if self.family == "vilbert":
            from fastvl.models.vilbert import ViLBERTForTasks

            return ViLBERTForTasks(config, num_labels=2, dropout=config.hidden_dropout_prob)
        from fastvl.finetune.tasks.albef_retrieval import ALBEFRetrieval

        return ALBEFRetrieval(config)

    def num_train(self) -> int:
        return len(self.split("train")[0].texts)

    def init_state(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """ViLBERT from a pretraining checkpoint: ``vil_logit`` starts as the zero-shot score, the
        alignment head's ``logit[aligned] - logit[not aligned]`` (so fine-tuning starts from the zero-shot
        ranking instead of a random head; vilbert-multi-task starts it random). A checkpoint that has a
        ``vil_logit`` (a fine-tuned one) keeps it."""
        if self.family != "vilbert" or "vil_logit.weight" in state or "cls.bi_seq_relationship.weight" not in state:
            return state
        weight, bias = state["cls.bi_seq_relationship.weight"], state["cls.bi_seq_relationship.bias"]
        return {**state, "vil_logit.weight": weight[:1] - weight[1:], "vil_logit.bias": bias[:1] - bias[1:]}

    # training ---------------------------------------------------------------------------------------

    def hard_pool(self) -> np.ndarray:
        """``[train images, K]``: each training image's hard negatives (indices into the split's images):
        the train split's ``hard_negatives`` file (:func:`read_hard_negatives`), else its ``HARD_POOL``
        nearest training images (cosine of the mean region feature), itself excluded."""
        if self._hard_pool is None:
            pool, images, _ = self.split("train")
            mined = self.task_dir.split("train").get("hard_negatives")
            if mined is not None:
                self._hard_pool = read_hard_negatives(mined, list(pool.images), trust_pickle=self.trust_pickle)
                return self._hard_pool
            means = np.stack([np.asarray(self.dataset[i].features, np.float32).mean(axis=0) for i in images])
            means /= np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)
            similarity = means @ means.T
            np.fill_diagonal(similarity, -np.inf)
            width = min(HARD_POOL, len(images) - 1)
            self._hard_pool = np.argsort(-similarity, axis=1, kind="stable")[:, :width]
        return self._hard_pool

    def collate(self, keys) -> dict:
        pool, images, pieces = self.split("train")
        if self.family == "albef":
            texts = [int(index) for _, index in keys]
            batch = text_batch([pieces[t] for t in texts], self.special, self.family, self.max_text_len)
            batch.update(image_batch(self.family, self.dataset, [images[pool.text_image[t]] for t in texts], 0))
            batch["image_ids"] = torch.tensor([pool.text_image[t] for t in texts], dtype=torch.long)
            batch["num_tokens"] = num_tokens(batch)
            return batch
        by_image: dict[int, list[int]] = {}
        for text, image in enumerate(pool.text_image):
            by_image.setdefault(image, []).append(text)
        hard = self.hard_pool()
        option_texts, option_images = [], []
        for epoch, index in keys:
            rng = np.random.default_rng((self.seed, int(epoch), int(index), 0x4E7))
            text = int(index)
            image = pool.text_image[text]
            other_image = int(rng.integers(len(images) - 1))
            other_image += other_image >= image
            other_text_image = int(rng.integers(len(images) - 1))
            other_text_image += other_text_image >= image
            other_text = by_image[other_text_image][int(rng.integers(len(by_image[other_text_image])))]
            hard_image = int(hard[image][int(rng.integers(hard.shape[1]))])
            hard_text = by_image[hard_image][int(rng.integers(len(by_image[hard_image])))]
            option_texts += [text, text, other_text, hard_text]
            option_images += [image, other_image, image, image]
        batch = text_batch([pieces[t] for t in option_texts], self.special, self.family, self.max_text_len)
        batch.update(region_batch(self.dataset, [images[i] for i in option_images], self.max_regions))
        batch["num_tokens"] = num_tokens(batch)
        return batch

    def step_inputs(self, micro, sampler) -> dict:
        return albef_step_inputs(micro, sampler)

    def loss(self, model, batch):
        if self.family == "vilbert":
            out = model(batch["input_ids"], batch["token_type_ids"], batch["text_mask"], batch["region_feats"],
                        batch["region_loc"], batch["region_mask"])
            scores = out.option_score.view(-1, 4)
            loss = F.cross_entropy(scores.float(), torch.zeros(scores.shape[0], dtype=torch.long,
                                                               device=scores.device))
            return loss, {"ce": loss}
        out = model(batch["images"], batch["input_ids"], batch["text_mask"], batch["image_ids"],
                    alpha_scale=batch.get("alpha_scale", 1.0), first_micro_step=batch.get("first_micro_step", True),
                    last_micro_step=batch.get("last_micro_step", True))
        return out.loss, {"itc": out.losses["itc"], "itm": out.losses["itm"]}

    # evaluation -------------------------------------------------------------------------------------

    def pool_inputs(self, split: str, ctx):
        """The split's texts and images as model inputs on ``ctx``'s device (whole pool)."""
        pool, images, pieces = self.split(split)
        text = ctx.to_device(text_batch(pieces, self.special, self.family, self.max_text_len))
        image = ctx.to_device(image_batch(self.family, self.dataset, images, self.max_regions))
        return pool, text, image

    @torch.no_grad()
    def evaluate(self, model, split, ctx):
        started = time.perf_counter()
        pool, text, image = self.pool_inputs(split, ctx)
        num_texts, num_images = len(pool.texts), len(pool.images)
        if self.family == "vilbert":
            mine, real = share(num_texts, ctx.rank, ctx.world)
            pairs = [(t, i) for t in mine for i in range(num_images)]
            scores = vilbert_pair_scores(model, text, image, pairs, self.zero_shot, ctx.batch_size)
            rows = scores.cpu().view(len(mine), num_images)[:real]
            scores_t2i = torch.tensor(gather(rows.tolist(), ctx), dtype=torch.float64)
            scores_i2t = scores_t2i.t()
            pairs_scored = num_texts * num_images
        else:
            image_embeds, image_feats, text_embeds, text_feats, mask = albef_features(model, image["images"], text,
                                                                                    ctx.batch_size)
            similarity = (image_feats @ text_feats.t()).float()
            blocks = []
            for queries_are_images, sim in ((True, similarity), (False, similarity.t())):
                mine, real = share(sim.shape[0], ctx.rank, ctx.world)
                rows = albef_rerank(model, image_embeds, text_embeds, mask, sim, mine, self.k_test,
                                    queries_are_images, ctx.batch_size)[:real]
                blocks.append(torch.tensor(gather(rows.tolist(), ctx), dtype=torch.float64))
            scores_i2t, scores_t2i = blocks
            pairs_scored = min(self.k_test, num_texts) * num_images + min(self.k_test, num_images) * num_texts
        out = metrics.retrieval_metrics(scores_i2t, pool.text_image, scores_t2i=scores_t2i)
        seconds = time.perf_counter() - started
        out.update(pairs_scored=pairs_scored, seconds=round(seconds, 3),
                   ms_per_query=round(1000 * seconds / (num_texts + num_images), 3),
                   chance_r1=100.0 / num_images,
                   head="alignment (zero-shot)" if self.family == "vilbert" and self.zero_shot else
                   ("vil_logit" if self.family == "vilbert" else f"itc + itm top {self.k_test}"))
        return out, {"scores_i2t": scores_i2t}
