"""Retrieval scoring: ViLBERT's cached text stream equals scoring every pair with the plain forward
(parity rule, float64 reference), ALBEF's ITC top-k + ITM re-ranking equals scoring every pair when k
covers the pool (and fastvl.models' ALBEF.retrieval_scores)."""

import copy
import os

import pytest
import torch

from fastvl.finetune.tasks.retrieval import (
    albef_features,
    albef_itm_scores,
    albef_rerank,
    vilbert_pair_scores,
    vilbert_pair_scores_uncached,
)
from fastvl.models.albef import ALBEF, ALBEFConfig
from fastvl.models.vilbert import ViLBERTConfig, ViLBERTForTasks
from fastvl.testing import assert_parity, random_padding_mask


def _pool(generator, texts=5, images=4, length=23, regions=37, feature_dim=24, vocab=50):
    text_mask = random_padding_mask(texts, length, generator=generator)
    text_mask[:, 0] = True
    region_mask = random_padding_mask(images, regions, generator=generator)
    region_mask[:, 0] = True
    corners = torch.rand(images, regions, 2, 2, generator=generator).sort(dim=2).values
    loc = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)
    area = (loc[..., 2] - loc[..., 0]) * (loc[..., 3] - loc[..., 1])
    text = {"input_ids": torch.randint(vocab, (texts, length), generator=generator),
            "token_type_ids": torch.zeros(texts, length, dtype=torch.long), "text_mask": text_mask}
    image = {"region_feats": torch.randn(images, regions, feature_dim, generator=generator),
             "region_loc": torch.cat([loc, area[..., None]], dim=-1), "region_mask": region_mask}
    return text, image


@pytest.mark.parametrize("zero_shot", [True, False])
@pytest.mark.parametrize("variant", ["tiny", "2-layer-small"])
def test_vilbert_cached_text_equals_uncached(generator, zero_shot, variant):
    overrides = dict(vocab_size=50, v_feature_size=24, v_target_size=7)
    if variant == "2-layer-small":  # text layers 0-2 run before the first co-attention, a visual layer too
        overrides.update(num_hidden_layers=5, v_biattention_id=[1, 2], t_biattention_id=[3, 4], v_num_hidden_layers=3)
    torch.manual_seed(0)
    model = ViLBERTForTasks(ViLBERTConfig.named("tiny", **overrides), num_labels=3).eval()
    exact = copy.deepcopy(model).double()
    exact.backend = exact.bert.backend = "reference"
    text, image = _pool(generator)
    pairs = [(t, i) for t in range(5) for i in range(4)]
    cached = vilbert_pair_scores(model, text, image, pairs, zero_shot, batch_size=9)
    uncached = vilbert_pair_scores_uncached(model, text, image, pairs, zero_shot, batch_size=9)
    double = {k: v.double() if v.is_floating_point() else v for k, v in image.items()}
    reference = vilbert_pair_scores_uncached(exact, text, double, pairs, zero_shot, batch_size=9).double()
    assert cached.shape == (20,)
    assert_parity("cached pair scores", cached, uncached, reference)
    assert torch.allclose(cached, uncached, rtol=1e-5, atol=1e-6)
    # a subset of pairs in another order gives the same scores
    some = [(4, 3), (0, 0), (3, 2)]
    assert torch.allclose(vilbert_pair_scores(model, text, image, some, zero_shot),
                          cached[[4 * 4 + 3, 0, 3 * 4 + 2]], rtol=1e-5, atol=1e-6)


def _albef(generator):
    torch.manual_seed(1)
    model = ALBEF(ALBEFConfig.named("tiny", vocab_size=50), with_mlm_head=False).eval()
    images = torch.randn(6, 3, 32, 32, generator=generator)
    mask = random_padding_mask(9, 13, generator=generator)
    mask[:, 0] = True
    ids = torch.randint(3, 50, (9, 13), generator=generator)
    ids[:, 0] = model.config.cls_token_id
    ids[~mask] = model.config.pad_token_id
    return model, images, {"input_ids": ids, "text_mask": mask}


def test_albef_rerank_with_k_covering_the_pool_equals_every_pair(generator):
    model, images, text = _albef(generator)
    image_embeds, image_feats, text_embeds, text_feats, mask = albef_features(model, images, text, batch_size=4)
    similarity = image_feats @ text_feats.t()
    every = albef_itm_scores(model, image_embeds, text_embeds, mask, [(i, t) for i in range(6) for t in range(9)],
                             batch_size=7).view(6, 9)
    i2t = albef_rerank(model, image_embeds, text_embeds, mask, similarity, list(range(6)), 9, True, batch_size=5)
    t2i = albef_rerank(model, image_embeds, text_embeds, mask, similarity.t(), list(range(9)), 6, False)
    assert torch.allclose(i2t, every, rtol=1e-5, atol=1e-6)
    assert torch.allclose(t2i, every.t(), rtol=1e-5, atol=1e-6)
    # the model's own retrieval_scores (one process) agree
    ref_i2t, ref_t2i = model.retrieval_scores(images, text["input_ids"], mask, k=9)
    assert torch.allclose(i2t, ref_i2t, rtol=1e-5, atol=1e-6)
    assert torch.allclose(t2i, ref_t2i[:, :6], rtol=1e-5, atol=1e-6)
    # k = 3: each image keeps its 3 most similar texts' ITM scores, -100 elsewhere; a share of queries
    top3 = albef_rerank(model, image_embeds, text_embeds, mask, similarity, [4, 1], 3, True)
    for row, query in enumerate([4, 1]):
        chosen = similarity[query].topk(3).indices
        assert torch.allclose(top3[row, chosen], every[query, chosen], rtol=1e-5, atol=1e-6)
        others = torch.ones(9, dtype=torch.bool)
        others[chosen] = False
        assert (top3[row, others] == -100).all()


def test_retrieval_benchmark_rows(tmp_path):
    """`fastvl bench retrieval --quick` (a subprocess: the CPU backends, not the Triton interpreter)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "fastvl", "bench", "retrieval", "--quick", "--model", "vilbert-tiny",
                           "albef-tiny", "--texts", "3", "--images", "2", "--k-test", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    document = json.load(open(tmp_path / "retrieval.json"))
    variants = [(row["name"], row["variant"]) for row in document["rows"]]
    assert variants == [("vilbert-tiny retrieval", v) for v in ("reference", "fused", "fused+cache")] + [
        ("albef-tiny retrieval", v) for v in ("reference", "fused")]
    assert all(row["pairs_per_s"] > 0 and row["flops"] > 0 for row in document["rows"])
    cache = [r for r in document["ratios"] if r["variant"] == "fused+cache" and r["baseline"] == "fused"]
    assert len(cache) == 1 and cache[0]["speedup"] > 0
    assert "pairs/s" in done.stdout


def _retrieval_task(tmp_path, hard_negatives=None, trust_pickle=False):
    import json

    from fastvl.data.synth import make_synthetic_dataset
    from fastvl.data.synth_task import make_task_set
    from fastvl.data.tasks import read_task_dir
    from fastvl.finetune.engine import open_images
    from fastvl.finetune.tasks.retrieval import RetrievalTask

    images, ret = str(tmp_path / "images"), str(tmp_path / "ret")
    if not (tmp_path / "ret").exists():
        make_synthetic_dataset(images, 14, feature_dim=8, num_classes=3, shard_size=16)
        make_task_set("retrieval", images, ret, val_images=2, test_images=2)
    manifest = json.load(open(tmp_path / "ret" / "task.json"))
    manifest["splits"]["train"].pop("hard_negatives", None)
    if hard_negatives is not None:
        manifest["splits"]["train"]["hard_negatives"] = hard_negatives
    json.dump(manifest, open(tmp_path / "ret" / "task.json", "w"))
    task_dir = read_task_dir(ret, "retrieval")
    dataset, special = open_images(task_dir, None)
    return RetrievalTask(task_dir, "vilbert", dataset, special, max_text_len=16, max_regions=8,
                         trust_pickle=trust_pickle)


def test_hard_negatives_file_as_the_original_mines_them(tmp_path):
    """A train split's `hard_negatives` file (vilbert-multi-task's hard_negative.pkl layout: the training
    image ids and a pool of indices per image, column 0 the image itself) replaces the feature proxy:
    JSON and .npz read safely, .pkl only trusted, every option 4 of the 4-way batch is a caption of one of
    the image's listed negatives, and bad files are clear errors naming the file."""
    import json
    import pickle

    import numpy as np

    from fastvl.data.format import DataError

    task = _retrieval_task(tmp_path)
    pool, _, _ = task.split("train")
    keys = list(pool.images)  # 10 training images
    assert task.hard_pool().shape == (10, 9)  # the proxy: every other training image, nearest first
    # the file lists the images in another order than the split
    listed = keys[::-1]
    hard = [[i, (i + 1) % 10, (i + 3) % 10] for i in range(10)]  # column 0: the image itself
    record = {"train_image_list": listed, "train_hard_pool": hard}
    expected = {listed[i]: {listed[(i + 1) % 10], listed[(i + 3) % 10]} for i in range(10)}
    json.dump(record, open(tmp_path / "hard.json", "w"))
    np.savez(tmp_path / "hard.npz", train_image_list=np.array(listed), train_hard_pool=np.array(hard))
    pickle.dump(record, open(tmp_path / "hard.pkl", "wb"))
    for name, trust in (("hard.json", False), ("hard.npz", False), ("hard.pkl", True)):
        task = _retrieval_task(tmp_path, os.path.join("..", name), trust_pickle=trust)
        mined = task.hard_pool()
        assert mined.shape == (10, 2), name
        for image, row in enumerate(mined):
            assert {keys[j] for j in row} == expected[keys[image]], name
        # option 4 of every caption's 4-way batch is a caption of one of its image's listed negatives
        images_of_caption = {}  # two images may share a caption's words
        for t, pieces in enumerate(task.split("train")[2]):
            images_of_caption.setdefault(tuple(pieces.tolist()), set()).add(keys[pool.text_image[t]])
        for text in range(len(pool.texts)):
            ids = task.collate([(0, text)])["input_ids"][3]
            words = tuple(ids[1: int((ids != task.special.pad).sum()) - 1].tolist())
            assert images_of_caption[words] & expected[keys[pool.text_image[text]]], (name, text)
    with pytest.raises(DataError, match="hard.pkl: a pickle file can run code"):
        _retrieval_task(tmp_path, "../hard.pkl").hard_pool()
    bad = {"missing key": {"train_image_list": listed},
           "no hard-negative row": {"train_image_list": listed[1:], "train_hard_pool": [[0, 1]] * 9},
           "indices must be in": {"train_image_list": listed, "train_hard_pool": [[0, 10]] * 10},
           "the image itself": {"train_image_list": listed, "train_hard_pool": [[i, i] for i in range(10)]},
           "must be .len": {"train_image_list": listed, "train_hard_pool": [[0, 1]] * 3}}
    for message, content in bad.items():
        json.dump(content, open(tmp_path / "bad.json", "w"))
        with pytest.raises(DataError, match="bad.json: " if message == "missing key" else message):
            _retrieval_task(tmp_path, "../bad.json").hard_pool()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz: not a readable .npz"):
        _retrieval_task(tmp_path, "../bad.npz").hard_pool()


def test_vil_logit_starts_as_the_zero_shot_alignment_score(generator):
    """From a pretraining checkpoint (no vil_logit) the fine-tuning head starts equal to the zero-shot
    score; a checkpoint with its own vil_logit (fine-tuned) keeps it."""
    from types import SimpleNamespace

    from fastvl.finetune.tasks.retrieval import RetrievalTask

    torch.manual_seed(0)
    model = ViLBERTForTasks(ViLBERTConfig.named("tiny", vocab_size=50, v_feature_size=24, v_target_size=7),
                            num_labels=3).eval()
    task = SimpleNamespace(family="vilbert")
    text, image = _pool(generator)
    pairs = [(t, i) for t in range(5) for i in range(4)]
    pretraining = {k: v for k, v in model.state_dict().items() if not k.startswith("vil_logit.")}
    fine_tuned = {**pretraining, "vil_logit.weight": model.vil_logit.weight.clone()}
    assert RetrievalTask.init_state(task, fine_tuned, model) is fine_tuned
    model.load_state_dict(RetrievalTask.init_state(task, pretraining, model))
    zero_shot = vilbert_pair_scores(model, text, image, pairs, True)
    assert torch.allclose(vilbert_pair_scores(model, text, image, pairs, False), zero_shot, rtol=1e-5, atol=1e-5)
