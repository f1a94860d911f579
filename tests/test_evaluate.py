"""Issue 7: evaluate.py, Recall@K of text->image and image->text retrieval."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from in_process import run_script

from evaluate import (
    CaptionFileError,
    chance_recall,
    load_captions,
    recall_at_k,
    top_k_rows,
)

ROOT = Path(__file__).resolve().parents[1]


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_script("evaluate.py", ["--quiet", *args], {"DEVICE": "cpu"})


def test_recall_counts_a_query_as_found_when_a_relevant_item_is_in_its_first_k():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["x", "y", "z"]]
    relevant = [{"a"}, {"a"}, {"a", "c"}, {"a"}]
    assert recall_at_k(rankings, relevant, [1, 2, 3]) == {1: 0.25, 2: 0.75, 3: 0.75}


def test_recall_refuses_mismatched_or_empty_inputs():
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [], [1])
    with pytest.raises(ValueError):
        recall_at_k([], [], [1])


def test_top_k_rows_ranks_by_dot_product_best_first():
    candidates = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.5, 0.0], [0.0, 0.0, 0.2, 0.7]], dtype=np.float32)
    assert top_k_rows(queries, candidates, 3) == [[1, 2, 0], [3, 2, 0]]
    assert top_k_rows(queries, candidates, 10) == [[1, 2, 0, 3], [3, 2, 0, 1]]


def test_perfect_and_reversed_vectors_give_recall_one_and_zero():
    images = np.eye(6, dtype=np.float32)
    owners = [0, 0, 1, 2, 3, 4, 5]  # image 0 has two captions
    captions = images[owners]
    ranked = top_k_rows(images, captions, 1)
    owned = [{i for i, owner in enumerate(owners) if owner == image} for image in range(6)]
    assert recall_at_k(ranked, owned, [1]) == {1: 1.0}
    reversed_ranking = top_k_rows(-images, captions, 1)
    assert recall_at_k(reversed_ranking, owned, [1]) == {1: 0.0}


def test_chance_recall_matches_the_counting_argument():
    assert chance_recall([1, 1], 100, [1, 10]) == pytest.approx({1: 0.01, 10: 0.1})
    # Two relevant among four candidates: the first place is relevant half the time, and three
    # places cannot all be taken by the two others.
    assert chance_recall([2], 4, [1, 3]) == pytest.approx({1: 0.5, 3: 1.0})
    assert chance_recall([1], 5, [10]) == pytest.approx({10: 1.0})


def test_caption_formats_all_give_captions_by_image(tmp_path):
    expected = {"1.jpg": ["a dog", "a brown dog"], "2.jpg": ["a cat"]}
    flickr = tmp_path / "captions.csv"
    flickr.write_text('image,caption\n1.jpg,a dog\n1.jpg,"a brown dog"\n2.jpg,a cat\n')
    kaggle = tmp_path / "results.csv"
    kaggle.write_text(
        "image_name| comment_number| comment\n1.jpg| 0| a dog\n1.jpg| 1| a brown dog\n2.jpg| 0| a cat\n"
    )
    coco_mini = tmp_path / "annotations.json"
    coco_mini.write_text(
        json.dumps(
            [{"image": "1.jpg", "captions": expected["1.jpg"]}, {"image": "2.jpg", "captions": ["a cat"]}]
        )
    )
    official = tmp_path / "captions_val.json"
    official.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "1.jpg"}, {"id": 9, "file_name": "2.jpg"}],
                "annotations": [
                    {"image_id": 7, "caption": "a dog"},
                    {"image_id": 9, "caption": "a cat"},
                    {"image_id": 7, "caption": "a brown dog"},
                ],
            }
        )
    )
    for path in (flickr, kaggle, coco_mini, official):
        assert load_captions(path) == expected, path.name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,text\n1.jpg,a dog\n", "needs a header with columns image and caption"),
        ('{"images": [1]', "not valid JSON"),
        ('[{"captions": ["a dog"]}]', "entry 0 has no image name"),
        ("image,caption\n", "holds no captions"),
    ],
)
def test_bad_caption_files_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / "captions.txt"
    path.write_text(content)
    with pytest.raises(CaptionFileError, match=message):
        load_captions(path)


def test_bad_input_on_the_command_line_is_a_message_not_a_traceback(tmp_path, coco_dataset, tiny_checkpoint):
    missing = run_evaluate("--captions", str(tmp_path / "nope.csv"), "--images", str(coco_dataset))
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: cannot read") and "Traceback" not in missing.stderr
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\n1.jpg,a dog\n")
    no_folder = run_evaluate(
        "--captions", str(captions), "--images", str(tmp_path / "nowhere"), "--model", str(tiny_checkpoint)
    )
    assert no_folder.returncode == 1 and "does not exist" in no_folder.stderr
    assert "Traceback" not in no_folder.stderr


def test_random_model_on_real_photos_is_at_chance_level(tmp_path, coco_dataset, coco_source, tiny_checkpoint):
    """A random-weight CLIP has no link between texts and images: recall must be near chance.

    One caption per photo (a Flickr-style CSV), N = 159 coco_mini photos. A ranking unrelated to the
    captions finds each caption's image in the top 10 with probability p = 10/N = 0.063; over N
    queries the standard deviation is at most sqrt(p(1-p)/N) = 0.019 when the queries are
    independent (and smaller when the random model ranks every query alike), so 3x chance (0.19)
    lies over 6 standard deviations above the mean. The model weights are seeded, so the run is
    deterministic besides. A pipeline that leaked the answer (ids, file names) would score near 1.
    """
    annotations = coco_source[1]
    captions_file = tmp_path / "captions.csv"
    with captions_file.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows([entry["image"], entry["captions"][0]] for entry in annotations)
    output = tmp_path / "recall.json"
    done = run_evaluate(
        "--captions", str(captions_file), "--images", str(coco_dataset),
        "--model", str(tiny_checkpoint), "--db", str(tmp_path / "db"), "--json", str(output),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "text -> image" in done.stdout and "image -> text" in done.stdout
    result = json.loads(output.read_text())
    images = len(annotations)
    assert result["images"] == result["captions"] == images
    for direction in ("text_to_image", "image_to_text"):
        recall, chance = result[direction], result[f"chance_{direction}"]
        assert chance["R@10"] == pytest.approx(10 / images)
        assert recall["R@1"] <= recall["R@5"] <= recall["R@10"]
        assert recall["R@10"] < 3 * chance["R@10"], (direction, recall, chance)
