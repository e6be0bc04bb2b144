"""Post-processing chosen on validation data (nnU-Net's rule): per class, keep the largest
component where that raised the validation Dice, or left it unchanged for a class that is one
structure in every validation reference; the run records it, `medseg infer` applies it."""

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
    assert all(math.isnan(v) for v in scores["3"][:2]) and scores["3"][2] == 0  # absent everywhere
    assert scores["1"][2] == 1 and scores["2"][2] == 2  # reference components: one organ, two lesions
    choice = choose_largest_component([scores, largest_component_scores(ref, ref, [1, 2, 3])])
    assert choice["largest_component_classes"] == [1]  # a strict gain for 1 only; 2 loses, 3 never seen
    assert choice["dice_after"]["1"] > choice["dice_before"]["1"] and choice["num_cases"] == 2
    assert choice["single_structure"] == {"1": True, "2": False, "3": False}
    assert choice["multi_structure"] == {"1": False, "2": True, "3": False}  # two lesions of 27 voxels: half outside
    assert scores["2"][3] == 0.5 and scores["1"][3] == 0.0
    # the ignore label is not scored: an island on ignored voxels is no false positive
    ref_ign = ref.copy()
    ref_ign[20:23, 2:4, 2:4] = 9
    assert largest_component_scores(pred, ref_ign, [1], ignore_label=9)["1"] == [1.0, 1.0, 1, 0.0]


def test_a_tie_chooses_the_largest_component_only_for_a_single_structure_class():
    """A validation prediction without stray islands scores the same with and without the step (the
    rule of a study that validates on a training case): chosen for a class that is one component in
    every validation reference, not for a two-part class (kidneys) nor on a loss."""
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[2:8, 2:8, 2:8] = 1                       # liver: one structure
    ref[12:15, 2:5, 2:5] = 2                     # kidneys: two structures
    ref[12:15, 18:21, 2:5] = 2
    ref[16:22, 10:16, 14:20] = 3                 # spleen: one structure ...
    pred = ref.copy()
    pred[12:15, 18:21, 2:5] = 0                  # one kidney missed: the prediction is one component
    pred[16:22, 12, 14:20] = 0                   # spleen predicted in two pieces: the largest loses Dice
    scores = largest_component_scores(pred, ref, [1, 2, 3])
    assert scores["1"][:2] == [1.0, 1.0] and scores["2"][0] == scores["2"][1] < 1  # ties
    assert scores["3"][1] < scores["3"][0]
    choice = choose_largest_component([scores, scores])
    assert choice["largest_component_classes"] == [1]
    assert choice["single_structure"] == {"1": True, "2": False, "3": True}
    # one validation case where the class is two structures vetoes the tie rule
    two = ref.copy()
    two[20:23, 20:23, 20:23] = 1
    assert choose_largest_component([scores, largest_component_scores(two, two, [1])])["largest_component_classes"] == []
    # two-value entries, without the component count, are not read as one structure
    assert choose_largest_component([{"1": [1.0, 1.0]}])["largest_component_classes"] == []
    assert choose_largest_component([{"1": [0.9, 0.95]}])["largest_component_classes"] == [1]



def test_a_gain_never_chooses_the_largest_component_for_a_class_seen_as_several_structures():
    """The organ study's lung: on the abdominal validation CT the two lung bases plus a few false-positive
    islands score higher reduced to the larger base, and a chest CT then lost a whole lung. A reference
    with >= 10% of the class outside its largest component vetoes the step; a reference with a small
    stray island (below that share) does not."""
    ref = np.zeros((32, 32, 32), np.uint8)
    ref[2:10, 2:12, 2:12] = 1                    # right lung base: 800 voxels
    ref[2:6, 20:25, 20:25] = 1                   # left lung base: 100 voxels (11% of the class)
    pred = ref.copy()
    pred[20:26, 20:26, 2:8] = 1                  # a 216-voxel false-positive island
    scores = largest_component_scores(pred, ref, [1])
    assert scores["1"][2] == 2 and math.isclose(scores["1"][3], 100 / 900)
    assert scores["1"][1] > scores["1"][0]       # the step raises the Dice on this case ...
    choice = choose_largest_component([scores])
    assert choice["largest_component_classes"] == [] and choice["multi_structure"] == {"1": True}  # ... yet is refused
    # with the smaller part a stray bit of the reference (4 of 804 voxels, 0.5%) the gain chooses it, as before
    small = ref.copy()
    small[2:6, 20:25, 20:25] = 0
    small[2:4, 20:22, 20] = 1
    pred_small = small.copy()
    pred_small[20:26, 20:26, 2:8] = 1
    scores_small = largest_component_scores(pred_small, small, [1])
    assert scores_small["1"][3] < 0.1 and scores_small["1"][1] > scores_small["1"][0]
    assert choose_largest_component([scores_small])["largest_component_classes"] == [1]
    # one validation case showing several structures is enough, whatever the others say
    assert choose_largest_component([scores_small, scores])["largest_component_classes"] == []
    # three-value entries (without the share) are not read as several structures
    assert choose_largest_component([{"1": [0.9, 0.95, 2]}])["largest_component_classes"] == [1]
    # the training labels can say it too: a validation CT with one lung base in view cannot
    assert choose_largest_component([scores_small], training_multi=["1"])["largest_component_classes"] == []
    assert choose_largest_component([scores_small], training_multi=["2"])["largest_component_classes"] == [1]


def test_preprocessing_records_each_class_share_outside_its_largest_component(preprocessed_phantoms):
    """``class_component_share`` in every labelled case's properties, equal to the share computed on the
    stored label; training reads the several-structure classes from it without opening a label."""
    from medseg.data.pipeline import load_case
    from medseg.data.preprocess import component_shares, reference_components
    from medseg.train.engine import _training_structures

    names = sorted(p.name[: -len(".json")] for p in (preprocessed_phantoms / "cases").glob("*.json"))
    seen = set()
    for name in names:
        _, lab, props = load_case(preprocessed_phantoms, name)
        shares = props["class_component_share"]
        assert shares and set(shares) == {str(c) for c in np.unique(lab[0]) if c}
        for c, v in shares.items():
            assert math.isclose(v, reference_components(lab[0] == int(c))[1])
            seen |= {c} if v >= 0.1 else set()
    assert _training_structures(preprocessed_phantoms, names, [], 1) == ({}, sorted(seen, key=int))
    two = np.zeros((12, 12, 12), np.uint8)
    two[1:4, 1:4, 1:4] = 1                       # 27 voxels
    two[8:11, 8:11, 8:10] = 1                    # 18 voxels, apart
    two[5:7, 5:7, 5:7] = 2
    assert component_shares(two, [1, 2, 3]) == {"1": 18 / 45, "2": 0.0}  # 3 absent: left out


def _write_cases(pre_dir, labels: dict, *, shares: bool = True) -> None:
    """Minimal preprocessed cases: ``<name>_{image,label}.npy`` and properties with ``class_locations``
    (and ``class_component_share`` unless ``shares=False``: data preprocessed before medseg recorded it)."""
    from medseg.data.preprocess import component_shares

    cases = pre_dir / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    for name, lab in labels.items():
        np.save(cases / f"{name}_image.npy", lab[None].astype(np.float32))
        np.save(cases / f"{name}_label.npy", lab[None])
        props = {"class_locations": {str(c): np.argwhere(lab == c)[:2].tolist() for c in range(1, 5)}}
        if shares:
            props["class_component_share"] = component_shares(lab, range(1, 5))
        (cases / f"{name}.json").write_text(json.dumps(props))


def test_classes_no_validation_reference_holds_fall_back_on_the_training_references(tmp_path):
    """The heart of a study validated on an abdominal CT: no validation evidence either way, so the
    training labels decide (one component in every training label that holds it)."""
    from medseg.train.engine import _training_structures

    a = np.zeros((20, 20, 20), np.uint8)
    a[2:6, 2:6, 2:6] = 1                         # liver: one structure
    a[10:12, 2:4, 2:4] = 2                       # kidneys: two structures in this case
    a[10:12, 14:16, 2:4] = 2
    a[14:18, 14:18, 14:18] = 3                   # heart: one structure
    b = np.zeros_like(a)
    b[3:9, 3:9, 3:9] = 1                         # liver again one; no kidney, no heart
    b[12:14, 12:14, 12:14] = 2
    for shares in (True, False):                 # from the recorded shares, or (older data) from the labels
        pre = tmp_path / str(shares)
        _write_cases(pre, {"a": a, "b": b, "v": np.zeros_like(a)}, shares=shares)  # v: validates nothing
        single, multi = _training_structures(pre, ["a", "b"], ["v"], 5)
        assert single == {"1": True, "2": False, "3": True} and multi == ["2"]  # 4: in no label, left out

    ref = np.zeros((20, 20, 20), np.uint8)       # the validation case: liver and kidneys, no heart
    ref[2:6, 2:6, 2:6] = 1
    ref[10:12, 2:4, 2:4] = 2
    ref[10:12, 14:16, 2:4] = 2
    pred = ref.copy()
    pred[2:6, 2:6, 5] = 0                        # liver in one piece, a little smaller: a tie, single -> chosen
    training = {"1": True, "2": False, "3": True}
    quiet = largest_component_scores(pred, ref, [1, 2, 3])  # heart absent from prediction and reference: NaN
    choice = choose_largest_component([quiet], training)
    assert choice["largest_component_classes"] == [1, 3] and choice["from_training_references"] == [3]
    stray = pred.copy()
    stray[16:18, 16:18, 16:18] = 3               # a few heart voxels predicted where the reference has none
    scores = largest_component_scores(stray, ref, [1, 2, 3])
    assert scores["3"] == [0.0, 0.0, 0, 0.0]
    assert choose_largest_component([scores], training)["largest_component_classes"] == [1, 3]
    assert choose_largest_component([scores], {**training, "3": False})["largest_component_classes"] == [1]
    assert choose_largest_component([scores])["largest_component_classes"] == [1]  # no fallback without training labels
    # a class some validation reference holds is decided there, whatever the training labels say
    split = pred.copy()
    split[4, 2:6, 2:6] = 0                       # the liver predicted in two pieces: the largest loses Dice
    assert choose_largest_component([largest_component_scores(split, ref, [1, 2, 3])], training)["largest_component_classes"] == [3]
    # a two-part class in the training labels is never chosen by the fallback
    assert 2 not in choose_largest_component([{"2": [float("nan"), float("nan"), 0]}], training)["largest_component_classes"]


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
    multi = {c for c, m in recorded["multi_structure"].items() if m}
    gain = {c for c, b in recorded["dice_before"].items() if recorded["dice_after"][c] > b + 1e-9} - multi
    tie = {c for c, b in recorded["dice_before"].items() if recorded["single_structure"][c]
           and abs(recorded["dice_after"][c] - b) <= 1e-9}
    fallback = {str(c) for c in recorded["from_training_references"]}
    assert not fallback & (gain | tie) and not multi & (tie | fallback)
    assert recorded["largest_component_classes"] == sorted((int(c) for c in gain | tie | fallback))
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


def test_training_structures_open_no_label_when_the_shares_are_recorded(tmp_path, monkeypatch):
    """The trainer's post-processing inputs come from the cases' properties; only data preprocessed
    before ``class_component_share`` existed has labels read, and only those holding a class no
    validation case holds."""
    from medseg.data import pipeline
    from medseg.train.engine import _training_structures

    one, two = np.zeros((12, 12, 12), np.uint8), np.zeros((12, 12, 12), np.uint8)
    one[1:4, 1:4, 1:4] = 1
    one[6:9, 6:9, 6:9] = 3                        # class 3: one structure here ...
    two[1:4, 1:4, 1:4] = 1
    two[1:3, 8:10, 8:10] = 3
    two[8:10, 1:3, 1:3] = 3                       # ... two there (half of it outside the largest)
    two[6:9, 6:9, 6:9] = 2
    read = []
    real = pipeline.load_case
    monkeypatch.setattr(pipeline, "load_case", lambda *a, **k: read.append(a[1]) or real(*a, **k))
    for shares in (True, False):
        pre = tmp_path / str(shares)
        _write_cases(pre, {"a": one, "b": two, "v": one * (one == 1)}, shares=shares)
        read.clear()
        assert _training_structures(pre, ["a", "b"], ["v"], 4) == ({"2": True, "3": False}, ["3"])  # v: class 1
        assert read == ([] if shares else ["a", "b"])
        assert _training_structures(pre, ["a"], ["v"], 4) == ({"3": True}, [])  # class 2 in no training label
        assert _training_structures(pre, ["a", "b"], [], 4)[0] == {}  # nothing validated, nothing to decide
        read.clear()
        # b holds 1-3: every class judged on validation data, no label opened (old data: the veto then
        # comes from the validation references alone)
        assert _training_structures(pre, ["a", "b"], ["b"], 4) == ({}, ["3"] if shares else []) and read == []
