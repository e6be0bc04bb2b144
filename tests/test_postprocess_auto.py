"""Post-processing chosen on validation data (nnU-Net's rule): per class, keep the largest
component only where that raised the validation Dice; the run records it, `medseg infer` applies it."""

from __future__ import annotations

import json
import math

import numpy as np
from scipy import ndimage

from medseg.cli import main
from medseg.config import load_config
from medseg.infer.postprocess import choose_largest_component, largest_component_scores, load_run_postprocessing
from medseg.io import read_volume
from medseg.train import train


def _n_components(mask: np.ndarray, value: int) -> int:
    return ndimage.label(mask == value, structure=np.ones((3, 3, 3), bool))[1]


def test_scores_and_choice_follow_the_dice():
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[2:8, 2:8, 2:8] = 1                       # one organ
    ref[12:15, 12:15, 12:15] = 2                 # a multi-focal class: two lesions
    ref[18:21, 18:21, 18:21] = 2
    pred = ref.copy()
    pred[20:23, 2:4, 2:4] = 1                    # a stray island of class 1 (12 voxels)
    pred[18:21, 18:21, 20] = 0                   # the second lesion a bit smaller (18 of 27 voxels)
    scores = largest_component_scores(pred, ref, [1, 2, 3])
    # class 1: 216 true voxels, 12 stray -> Dice 432/444 before, 1 after
    assert math.isclose(scores["1"][0], 2 * 216 / (228 + 216)) and scores["1"][1] == 1.0
    # class 2: removing the smaller lesion loses 18 true voxels: 2*18/(18+27) after vs 2*45/(45+54) before
    assert math.isclose(scores["2"][0], 2 * 45 / (45 + 54)) and math.isclose(scores["2"][1], 2 * 27 / (27 + 54))
    assert all(math.isnan(v) for v in scores["3"])  # absent everywhere
    choice = choose_largest_component([scores, largest_component_scores(ref, ref, [1, 2, 3])])
    assert choice["largest_component_classes"] == [1]  # a strict gain for 1 only; 2 loses, 3 never seen
    assert choice["dice_after"]["1"] > choice["dice_before"]["1"] and choice["num_cases"] == 2
    # the ignore label is not scored: an island on ignored voxels is no false positive
    ref_ign = ref.copy()
    ref_ign[20:23, 2:4, 2:4] = 9
    assert largest_component_scores(pred, ref_ign, [1], ignore_label=9)["1"] == [1.0, 1.0]


def test_training_records_the_choice_and_infer_auto_applies_it(preprocessed_phantoms, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]",
                             "data.patch_size=[16,16,16]", "train.epochs=1", "train.iters_per_epoch=1",
                             "data.num_workers=0", "data.val_cases=[phantom_003]", "train.tb_num_cases=0"])
    train(cfg, run)
    recorded = load_run_postprocessing(run)
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert recorded == summary["postprocessing"]
    assert set(recorded["dice_before"]) == {str(c) for c in range(1, json.loads((run / "plans.json").read_text())["num_classes"])}
    assert recorded["largest_component_classes"] == [int(c) for c, b in recorded["dice_before"].items()
                                                      if recorded["dice_after"][c] > b + 1e-9]
    assert "largest_component" not in summary["metric_per_case"][0]  # nnU-Net's summary layout unchanged

    # infer: auto (the default) = the recorded classes reduced to their largest component, the others raw
    image = sorted((preprocessed_phantoms.parent / "raw" / "imagesTs").glob("*.nii.gz"))[0]
    assert main(["infer", "-m", str(run), "-i", str(image), "-o", str(tmp_path / "raw"), "--checkpoint", "final",
                 "--postprocess", "none"]) == 0
    raw = read_volume(next((tmp_path / "raw").glob("*.nii.gz"))).array
    fragmented = [int(c) for c in np.unique(raw) if c and _n_components(raw, int(c)) > 1]
    assert fragmented  # a 1-iteration net leaves stray islands: something to remove
    pick = {"largest_component_classes": fragmented[:1], "dice_before": {}, "dice_after": {}, "num_cases": 1}
    (run / "postprocessing.json").write_text(json.dumps(pick))
    assert main(["infer", "-m", str(run), "-i", str(image), "-o", str(tmp_path / "auto"), "--checkpoint", "final"]) == 0
    auto = read_volume(next((tmp_path / "auto").glob("*.nii.gz"))).array
    for c in np.unique(raw):
        if c == fragmented[0]:
            assert _n_components(auto, int(c)) == 1 and np.all(raw[auto == c] == c)
        elif c:
            assert np.array_equal(auto == c, raw == c)
    (run / "postprocessing.json").unlink()  # a run that never validated: auto = none
    assert main(["infer", "-m", str(run), "-i", str(image), "-o", str(tmp_path / "none"), "--checkpoint", "final"]) == 0
    assert np.array_equal(read_volume(next((tmp_path / "none").glob("*.nii.gz"))).array, raw)
