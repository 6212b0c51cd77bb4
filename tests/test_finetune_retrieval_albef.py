"""ALBEF retrieval fine-tuning with several captions per image (ALBEF's ``idx`` targets): ITC targets
spread over every caption of the image (batch and queue), ITM hard negatives never of the same image,
and with all ids distinct exactly pretraining's single-positive objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvl.finetune.tasks.albef_retrieval import (
    NO_IMAGE,
    ALBEFRetrieval,
    itm_negatives_of_other_images,
    multi_positive_itc_loss,
    positive_targets,
)
from fastvl.models.albef import ALBEF, ALBEFConfig
from fastvl.ops import itc_loss
from fastvl.train.albef import ALBEFPretraining


def _features(generator, batch, queue, embed=16, dtype=torch.float32):
    def unit(*shape, dim=-1):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=dim).to(dtype)

    return (unit(batch, embed), unit(batch, embed), unit(embed, queue, dim=0), unit(embed, queue, dim=0),
            unit(batch, embed), unit(batch, embed))


def test_two_captions_of_one_image_share_the_target_and_the_loss_is_the_hand_computed_one():
    ids = torch.tensor([7, 7, 3])
    queue_ids = torch.tensor([[NO_IMAGE, 3, NO_IMAGE]])
    targets = positive_targets(ids, torch.cat([ids, queue_ids[0]]))
    assert torch.equal(targets, torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0],
                                              [0, 0, 0.5, 0, 0.5, 0]]))
    # alpha = 0, temp = 1, no queue: images 0 and 1 show (7), image 2 shows (3); similarities are 0 / 1
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    empty = torch.zeros(2, 0)
    loss = multi_positive_itc_loss(img, txt, empty, empty, 1.0, 0.0, img.detach(), txt.detach(), ids,
                                   torch.zeros(1, 0, dtype=torch.long))
    e = math.e
    # i2t rows [1 0 0], [1 0 0], [0 1 1] with targets [.5 .5 0], [.5 .5 0], [0 0 1]
    i2t = (2 * (math.log(e + 2) - 0.5) + math.log(1 + 2 * e) - 1) / 3
    # t2i rows [1 1 0], [0 0 1], [0 0 1] with targets [.5 .5 0], [.5 .5 0], [0 0 1]
    t2i = (math.log(2 * e + 1) - 1 + math.log(2 + e) + math.log(2 + e) - 1) / 3
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_multi_positive_itc_with_queue_and_distillation_matches_a_float64_loop(generator):
    img, txt, img_q, txt_q, img_m, txt_m = _features(generator, 5, 6, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 1])
    queue_ids = torch.tensor([[2, NO_IMAGE, 0, 5, 1, 0]])
    temp, alpha = 0.07, 0.4
    loss = multi_positive_itc_loss(img.float(), txt.float(), img_q.float(), txt_q.float(), temp, alpha, img_m.float(),
                                   txt_m.float(), ids, queue_ids)
    bank_ids = ids.tolist() + queue_ids[0].tolist()
    total = 0.0
    for feat, feat_m, other_m, other_q in ((img, img_m, txt_m, txt_q), (txt, txt_m, img_m, img_q)):
        bank = torch.cat([other_m.t(), other_q], dim=1)
        for b in range(5):
            sim, sim_m = feat[b] @ bank / temp, feat_m[b] @ bank / temp
            positives = [j for j, i in enumerate(bank_ids) if i == int(ids[b])]
            for j in range(bank.shape[1]):
                target = alpha * torch.softmax(sim_m, 0)[j] + (1 - alpha) * (j in positives) / len(positives)
                total -= float(target * torch.log_softmax(sim, 0)[j]) / 5 / 2
    assert loss.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("queue_ids", ["empty", "other images"])
def test_distinct_images_give_pretrainings_single_positive_itc(generator, queue_ids):
    img, txt, img_q, txt_q, img_m, txt_m = _features(generator, 7, 14)
    ids = torch.tensor([4, 9, 0, 2, 8, 1, 3])
    bank = torch.full((1, 14), NO_IMAGE) if queue_ids == "empty" else torch.arange(100, 114)[None]
    temp = torch.tensor(0.07)
    for alpha in (0.0, 0.4):
        ours = multi_positive_itc_loss(img, txt, img_q, txt_q, temp, alpha, img_m, txt_m, ids, bank)
        for backend in ("reference", None):
            single = itc_loss(img, txt, img_q, txt_q, temp, alpha, img_m, txt_m, backend=backend)
            assert torch.allclose(ours, single, rtol=1e-5, atol=1e-7), (alpha, backend)


def test_hard_negatives_never_pair_captions_of_the_same_image(generator):
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3])
    same = ids[:, None] == ids[None, :]
    for seed in range(300):
        draw = torch.Generator().manual_seed(seed)
        sim_i2t, sim_t2i = torch.randn(8, 8, generator=draw) * 5, torch.randn(8, 8, generator=draw) * 5
        sim_i2t[same] += 60  # the softmax mass sits on the same-image pairs
        sim_t2i[same] += 60
        if seed % 50 == 0:
            sim_i2t[3] = float("inf")  # an overflowed row still draws another image
        neg_txt, neg_img, has_negative = itm_negatives_of_other_images(sim_i2t, sim_t2i, ids, draw)
        assert has_negative.all()
        assert (ids[neg_txt] != ids).all() and (ids[neg_img] != ids).all(), seed
    # a micro-batch with a single image has no negative; one other image is the only choice
    _, _, has_negative = itm_negatives_of_other_images(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([5, 5, 5]))
    assert not has_negative.any()
    neg_txt, neg_img, has_negative = itm_negatives_of_other_images(torch.zeros(3, 3), torch.zeros(3, 3),
                                                                   torch.tensor([5, 5, 6]))
    assert has_negative.all() and neg_txt[2] in (0, 1) and neg_img[2] in (0, 1)
    assert neg_txt[:2].tolist() == [2, 2] and neg_img[:2].tolist() == [2, 2]


def _models():
    torch.manual_seed(3)
    config = ALBEFConfig.named("tiny", vocab_size=50)
    retrieval = ALBEFRetrieval(config)
    pretraining = ALBEFPretraining(config, with_mlm_head=False)
    state = retrieval.state_dict()
    del state["idx_queue"]
    pretraining.load_state_dict(state)
    return retrieval, pretraining


def _inputs(generator, batch=4, length=11):
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 50, (batch, length), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 7:] = False
    ids[~mask] = 0
    return images, ids, mask


def test_distinct_images_give_the_old_objective_and_shared_images_change_it(generator):
    retrieval, pretraining = _models()
    retrieval.eval(), pretraining.eval()
    images, ids, mask = _inputs(generator)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    new = retrieval(images, ids, mask, torch.tensor([10, 11, 12, 13]), itm_negatives=negatives)
    # the old path: pretraining's forward (fused single-positive ITC) on the same ITM pairs
    old = ALBEF.forward(pretraining, images, ids, mask, update=False, itm_negatives=negatives, mlm=False)
    for name in ("itc", "itm"):
        assert torch.allclose(new.losses[name], old.losses[name], rtol=1e-5, atol=1e-6), name
    # captions 0 and 2 of one image: the ITC targets (and so the loss) change, ITM on the same pairs does not
    shared = retrieval(images, ids, mask, torch.tensor([10, 11, 10, 13]), itm_negatives=negatives)
    # (an untrained model's features are close together, so the change is small, yet far above rounding)
    assert (shared.losses["itc"] - old.losses["itc"]).abs() > 1e-5 * old.losses["itc"]
    assert torch.allclose(shared.losses["itm"], old.losses["itm"], rtol=1e-5, atol=1e-6)


def test_training_steps_enqueue_the_image_ids_and_queue_positives_count(generator):
    retrieval, _ = _models()
    retrieval.train()
    images, ids, mask = _inputs(generator)
    # a step of two micro-batches: the queue receives both micro-batches' ids after the second
    retrieval(images[:2], ids[:2], mask[:2], torch.tensor([5, 6]), first_micro_step=True, last_micro_step=False)
    assert (retrieval.idx_queue == NO_IMAGE).all() and int(retrieval.queue_ptr) == 0
    out = retrieval(images[2:], ids[2:], mask[2:], torch.tensor([5, 7]), first_micro_step=False, last_micro_step=True)
    assert retrieval.idx_queue[0, :4].tolist() == [5, 6, 5, 7] and (retrieval.idx_queue[0, 4:] == NO_IMAGE).all()
    assert int(retrieval.queue_ptr) == 4 and torch.isfinite(out.loss)
    out.loss.backward()
    assert retrieval.temp.grad is not None and retrieval.itm_head.weight.grad.abs().sum() > 0
    # the queue's ids now enter the ITC targets: the loss equals the formula with them, not without
    retrieval.eval()
    with torch.no_grad():
        image_feat = retrieval.image_features(images[:2])[1]
        text_feat = retrieval.text_features(ids[:2], mask[:2])[1]
        image_feat_m = retrieval.image_features(images[:2], momentum=True)[1]
        text_feat_m = retrieval.text_features(ids[:2], mask[:2], momentum=True)[1]
        step = retrieval(images[:2], ids[:2], mask[:2], torch.tensor([5, 6]), itm_negatives=(torch.tensor([1, 0]),
                                                                                            torch.tensor([1, 0])))
        args = (image_feat, text_feat, retrieval.image_queue, retrieval.text_queue, retrieval.temp,
                retrieval.config.alpha, image_feat_m, text_feat_m, torch.tensor([5, 6]))
        with_queue = multi_positive_itc_loss(*args, retrieval.idx_queue)
        without = multi_positive_itc_loss(*args, torch.full_like(retrieval.idx_queue, NO_IMAGE))
    assert torch.allclose(step.losses["itc"], with_queue, rtol=1e-5)
    assert not torch.allclose(with_queue, without, rtol=1e-4)


def test_bad_image_ids_are_a_clear_error(generator):
    retrieval, _ = _models()
    images, ids, mask = _inputs(generator)
    with pytest.raises(ValueError, match="image_ids"):
        retrieval(images, ids, mask, torch.tensor([1, 2, 3]))


def test_the_collator_passes_each_captions_image(tmp_path):
    from fastvl.data.synth import make_synthetic_dataset
    from fastvl.data.synth_task import make_task_set
    from fastvl.data.tasks import read_task_dir
    from fastvl.finetune.engine import open_images
    from fastvl.finetune.tasks.retrieval import RetrievalTask

    images = str(tmp_path / "images")
    make_synthetic_dataset(images, 16, feature_dim=8, num_classes=3, shard_size=16, image_size=16)
    make_task_set("retrieval", images, str(tmp_path / "ret"), val_images=3, test_images=3)
    task_dir = read_task_dir(str(tmp_path / "ret"), "retrieval")
    dataset, special = open_images(task_dir, None)
    task = RetrievalTask(task_dir, "albef", dataset, special, max_text_len=16, max_regions=8)
    pool = task.split("train")[0]
    texts = [0, 1, 5, 2, 11]
    batch = task.collate([(0, t) for t in texts])
    assert batch["image_ids"].tolist() == [pool.text_image[t] for t in texts]
    assert batch["image_ids"][0] == batch["image_ids"][1]  # the first two captions describe one image
    assert batch["image_ids"].dtype == torch.int64 and batch["images"].shape[0] == len(texts)
    assert isinstance(task.make_model(ALBEFConfig.named("tiny", vocab_size=50, image_res=16)), ALBEFRetrieval)
