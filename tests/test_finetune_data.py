"""Task annotation readers (VQA v2, Karpathy split, ALBEF JSON) on hand-written fixtures, their errors on
bad files, and `fastvl data synth-task`."""

import json
import os
import shutil

import pytest
from fixture_files import edited_json

from fastvl.data import tasks
from fastvl.data.format import DataError
from fastvl.data.synth import make_synthetic_dataset
from fastvl.data.synth_task import make_task_set

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_read_vqa_v2():
    questions = tasks.read_vqa(fixture("vqa_v2_questions.json"), fixture("vqa_v2_annotations.json"))
    assert [q.question_id for q in questions] == [458752000, 458752001, 262146000]
    assert questions[1].image_id == "458752" and questions[1].question == "How many people are there?"
    assert questions[1].answers.count("2") == 7 and "two" in questions[1].answers and len(questions[1].answers) == 10
    assert questions[2].answer_type == "yes/no"
    unannotated = tasks.read_vqa(fixture("vqa_v2_questions.json"))
    assert unannotated[0].answers is None


def test_bad_vqa_files_name_file_and_record(tmp_path):
    questions = fixture("vqa_v2_questions.json")
    bad = edited_json(fixture("vqa_v2_annotations.json"), tmp_path, lambda d: d["annotations"][1].pop("answers"))
    with pytest.raises(DataError, match=r"vqa_v2_annotations.json: annotations\[1\]"):
        tasks.read_vqa(questions, bad)
    bad = edited_json(fixture("vqa_v2_annotations.json"), tmp_path, lambda d: d["annotations"][2].update(image_id=7))
    with pytest.raises(DataError, match=r"annotations\[2\]: question_id 262146000 has image_id 7"):
        tasks.read_vqa(questions, bad)
    bad = edited_json(fixture("vqa_v2_annotations.json"), tmp_path, lambda d: d["annotations"].pop(0))
    with pytest.raises(DataError, match="have no annotation, e.g. question_id 458752000"):
        tasks.read_vqa(questions, bad)
    bad_q = edited_json(fixture("vqa_v2_questions.json"), tmp_path, lambda d: d["questions"].append(d["questions"][0]))
    with pytest.raises(DataError, match=r"questions\[3\]: question_id 458752000 repeats questions\[0\]"):
        tasks.read_vqa(bad_q)
    (tmp_path / "broken.json").write_text("{\"questions\": [")
    with pytest.raises(DataError, match="broken.json: not readable JSON"):
        tasks.read_vqa(str(tmp_path / "broken.json"))


def test_answer_vocabulary_file_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"yes": 1, "no": 0, "2": 2}))
    assert tasks.read_answer_vocabulary(str(tmp_path / "a.json")) == ["no", "yes", "2"]
    (tmp_path / "b.json").write_text(json.dumps({"yes": 0, "no": 0}))
    with pytest.raises(DataError, match="labels must be"):
        tasks.read_answer_vocabulary(str(tmp_path / "b.json"))


def test_read_karpathy_and_albef():
    train = tasks.read_karpathy(fixture("karpathy_dataset.json"), "train")  # restval counts as train
    assert train.images == ("1000092795", "10002456") and train.text_image == (0, 0, 1)
    test = tasks.read_karpathy(fixture("karpathy_dataset.json"), "test")
    assert test.images == ("1000268201",) and test.texts[1] == "A little girl climbing."
    albef_train = tasks.read_albef(fixture("albef_train.json"))
    assert albef_train.images == ("1000092795", "10002456") and albef_train.text_image == (0, 0, 1)
    albef_test = tasks.read_albef(fixture("albef_test.json"))
    assert albef_test.images == ("1000268201", "1000344755") and albef_test.text_image == (0, 0, 1)


def test_bad_retrieval_files(tmp_path):
    bad = edited_json(fixture("karpathy_dataset.json"), tmp_path, lambda d: d["images"][2].update(sentences=[{"tokens": []}]))
    with pytest.raises(DataError, match=r"images\[2\] \(1000268201.jpg\): 'sentences'"):
        tasks.read_karpathy(bad, "test")
    with pytest.raises(DataError, match="no image has split 'dev'"):
        tasks.read_karpathy(fixture("karpathy_dataset.json"), "dev")
    (tmp_path / "albef.json").write_text(json.dumps([{"image": "x.jpg", "caption": 3}]))
    with pytest.raises(DataError, match="albef.json: record 0"):
        tasks.read_albef(str(tmp_path / "albef.json"))


def test_image_lookup_by_id_then_number():
    lookup = tasks.ImageLookup(["391895", "synth-000002", "1000092795"], "feats")
    assert lookup("COCO_val2014_000000391895", "here") == 0
    assert lookup("synth-000002", "here") == 1
    with pytest.raises(DataError, match="here: image '77' is not in the feature set feats"):
        lookup("77", "here")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("images"))
    make_synthetic_dataset(out, 48, feature_dim=16, num_classes=6, shard_size=32)
    return out


def test_synth_task_vqa(images, tmp_path):
    manifest = make_task_set("vqa", images, str(tmp_path / "vqa"), val_images=8, test_images=8)
    task = tasks.read_task_dir(str(tmp_path / "vqa"), "vqa")
    train = tasks.read_vqa_split(task.split("train"))
    assert len(train) == manifest["counts"]["train"] and all(len(q.answers) == 10 for q in train)
    assert {q.question.split()[0] for q in train} == {"how", "is"}
    val = tasks.read_vqa_split(task.split("val"))
    test = tasks.read_vqa_split(task.split("test"))
    assert [q.question_id for q in test] != [q.question_id for q in val] and test[0].answers is None
    answers = tasks.read_answer_vocabulary(task.answers)
    assert {"yes", "no", "1"} <= set(answers)
    with pytest.raises(DataError, match="holds a 'vqa' task, not 'retrieval'"):
        tasks.read_task_dir(str(tmp_path / "vqa"), "retrieval")
    assert manifest["counts"] == {"train": len(train), "val": len(val), "test": len(test)}
    # "how many X" is answered with the number of X regions of the image (the majority of the humans)
    from fastvl.data.format import RegionDataset
    from fastvl.data.synth import CLASS_NAMES
    from fastvl.data.synth_task import image_contents
    from fastvl.data.tokenizer import load_tokenizer
    from fastvl.finetune.metrics import normalize_answer

    dataset = RegionDataset(images, load_tokenizer(os.path.join(images, "vocab.txt")))
    contents = dict(zip(dataset.image_ids, image_contents(dataset)))
    for q in train:
        if q.question.startswith("how many"):
            name = q.question.split()[2][:-1]
            spoken = [normalize_answer(a) for a in q.answers]  # digits, or number words
            assert spoken.count(str(contents[q.image_id][CLASS_NAMES.index(name)])) >= 4


def test_synth_task_retrieval(images, tmp_path):
    make_task_set("retrieval", images, str(tmp_path / "ret"), val_images=8, test_images=8)
    task = tasks.read_task_dir(str(tmp_path / "ret"))
    test = tasks.read_retrieval(task.split("test"), "test")
    assert len(test.images) == 8 and len(test.texts) == 40 and test.text_image[:6] == (0, 0, 0, 0, 0, 1)
    with pytest.raises(DataError, match="cannot make train"):
        make_task_set("retrieval", images, str(tmp_path / "x"), val_images=30, test_images=30)


def test_synth_task_command(images, tmp_path):
    from fastvl.cli import main

    assert main(["data", "synth-task", "--task", "retrieval", "--images", images, "--out", str(tmp_path / "r"),
                 "--val-images", "4", "--test-images", "4"]) == 0
    assert json.load(open(tmp_path / "r" / "task.json"))["task"] == "retrieval"
    shutil.rmtree(tmp_path / "r")
