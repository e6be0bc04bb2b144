"""nnU-Net v2 under a wall-clock budget, for ``head_to_head.py`` (needs ``pip install -e '.[bench]'``).

1. ``make_raw_dataset``: the dataset's ``imagesTr`` / ``labelsTr`` as an nnU-Net raw dataset
   (``Dataset987_<name>``; images linked as ``<case>_0000.nii.gz``, labels as ``<case>.nii.gz``,
   ``dataset.json`` with the same labels and the ``CT`` channel name, so CT normalization).
2. ``plan_and_preprocess``: nnU-Net's own fingerprint (with its dataset integrity check), default
   planner (``ExperimentPlanner``, plans ``nnUNetPlans``) and preprocessing of ``3d_fullres`` --
   what ``nnUNetv2_plan_and_preprocess -d 987 -c 3d_fullres`` does.
3. ``train``: ``nnUNetTrainer`` on fold ``all`` (every training case; there are too few for 5 folds),
   stopped by the budget (:func:`budget_trainer`). nnU-Net itself has no time limit: its schedule is
   1000 epochs of 250 iterations (days on a CPU). The subclass changes *when* it stops, the way
   nnU-Net's own ``nnUNetTrainer_<X>epochs`` variants do (a smaller ``num_epochs``, the poly LR
   decaying to zero over it), with X chosen by the clock: epochs are shortened to ``iters`` training
   and ``val_iters`` pseudo-validation iterations (nnU-Net's 250:50 ratio), after each epoch
   ``num_epochs`` (the LR schedule's length) becomes the epochs the budget covers at the mean epoch
   time so far, as ``train.max_minutes`` does for medseg, and after every iteration training ends
   (``on_train_end``: ``checkpoint_final.pth``) when the next one, at the mean time per iteration so
   far (validations included), would end past the budget -- the stock recipe's rule; on a CPU an
   nnU-Net iteration takes tens of seconds, so stopping only at epoch ends would waste minutes.
   The per-epoch extras that short epochs would multiply are left out of the budget: the
   ``checkpoint_best`` / ``checkpoint_latest`` files (never read here: every contender is scored
   with its final weights) and the progress plot (drawn once, after training). Everything else is
   nnU-Net's: network, patch size and batch from its plans, augmentation, loss, SGD, its precision
   policy (autocast on CUDA only: fp32 on a CPU), its data-augmentation workers
   (``nnUNet_n_proc_DA``), ``checkpoint_final``. Killing the trainer with SIGTERM and taking
   ``checkpoint_latest`` instead would lose up to ``save_every`` (50) epochs and keep the LR at its start.
4. Snapshots: after the first training iteration that ends past each mark, the weights are written
   as ``checkpoint_at_<m>min.pth`` (and the final ones as ``checkpoint_h2h_final.pth``) with the
   fields nnU-Net's predictor reads and ``trainer_name = nnUNetTrainer`` (the subclass builds the
   very same network; the predictor only looks trainer classes up inside nnunetv2).
5. ``predict``: ``nnUNetPredictor`` (tile step 0.5, Gaussian, **no mirroring TTA**: the other
   contenders predict without TTA too, and TTA would cost up to 8x the inference time) on
   ``imagesTs``, written as ``<case>.nii.gz``.

6. ``untrained_model``: an untrained model folder built from the plans by nnU-Net's own trainer, for
   timing its predictor (``infer_speed.py``'s ``nnunet_*`` rows).

nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` when imported:
:func:`set_environment` must run before the first ``import nnunetv2``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

DATASET_ID = 987
NNUNET_MISSING = "skipped: nnunetv2 not installed (pip install -e '.[bench]')"


def set_environment(work: Path, workers: int) -> dict[str, Path]:
    """nnU-Net's folders under ``work`` and its process counts (data augmentation, preprocessing)."""
    dirs = {k: work / k for k in ("raw", "preprocessed", "results")}
    for key, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{key}"] = str(d)
    os.environ["nnUNet_n_proc_DA"] = str(workers)
    os.environ["nnUNet_def_n_proc"] = str(max(1, workers))
    os.environ["nnUNet_compile"] = "f"  # nnU-Net disables it on the CPU anyway
    return dirs


def make_raw_dataset(info, raw: Path) -> str:
    """Link the training cases of a :class:`medseg.data.datasets.DatasetInfo` into ``raw``; returns the dataset name."""
    name = f"Dataset{DATASET_ID}_{''.join(ch for ch in info.name if ch.isalnum()) or 'HeadToHead'}"
    out = raw / name
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case in info.cases:
        for ch, img in enumerate(case.images):
            _link(img, out / "imagesTr" / f"{case.name}_{ch:04d}.nii.gz")
        _link(case.label, out / "labelsTr" / f"{case.name}.nii.gz")
    meta = {"channel_names": dict(info.channel_names), "labels": dict(info.labels), "numTraining": len(info.cases),
            "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return name


def _link(src: Path, dst: Path) -> None:
    if not str(src).endswith(".nii.gz"):
        raise ValueError(f"{src}: the nnU-Net contender expects .nii.gz files")
    if not dst.exists():
        dst.symlink_to(Path(src).resolve())


def plan_and_preprocess(configuration: str, gpu_memory_gb: float | None = None) -> None:
    """nnU-Net's fingerprint, plans (``gpu_memory_gb``: its planner's memory target, default 8) and preprocessing."""
    n = int(os.environ["nnUNet_def_n_proc"])
    workers = os.environ["nnUNet_n_proc_DA"]
    os.environ["nnUNet_n_proc_DA"] = str(max(1, int(workers)))  # the planner sets torch's threads to it
    try:
        _plan_and_preprocess(configuration, n, gpu_memory_gb)
    finally:
        os.environ["nnUNet_n_proc_DA"] = workers


def _plan_and_preprocess(configuration: str, n: int, gpu_memory_gb: float | None) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    extract_fingerprints([DATASET_ID], num_processes=n, check_dataset_integrity=True)
    plan_experiments([DATASET_ID], gpu_memory_target_in_gb=gpu_memory_gb)
    preprocess([DATASET_ID], configurations=(configuration,), num_processes=(n,))


# written by nnU-Net after an epoch (best EMA pseudo Dice; every 50 epochs): never read here, and with
# 25x shorter epochs they would cost 25x what they cost in nnU-Net's own schedule
PER_EPOCH_FILES = ("checkpoint_best.pth", "checkpoint_latest.pth")


class BudgetSpent(Exception):
    """Raised after the last epoch that fits in the budget."""


def budget_trainer(minutes: float, marks_min=(), iters: int = 10, val_iters: int = 2):
    """An ``nnUNetTrainer`` subclass that stops after ``minutes`` of training (see the module docstring)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerWallClock(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict, device=None):
            # nnU-Net records its constructor's arguments by this signature (for checkpoints)
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = iters, val_iters
            self.budget_s, self.pending = minutes * 60.0, sorted(m * 60.0 for m in marks_min if m < minutes)
            self.snapshots, self.steps, self.epochs_run, self.train_s = [], 0, 0, 0.0

        def on_train_start(self):
            super().on_train_start()
            self.plot_progress, self.logger.plot_progress_png = self.logger.plot_progress_png, lambda *_: None
            self.t0 = time.perf_counter()  # data loaders and network set up: the clock starts

        def save_checkpoint(self, filename: str) -> None:
            if Path(filename).name not in PER_EPOCH_FILES:
                super().save_checkpoint(filename)

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            self.steps += 1
            elapsed = time.perf_counter() - self.t0
            while self.pending and elapsed >= self.pending[0]:
                mark = self.pending.pop(0) / 60
                path = self.snapshot(f"checkpoint_at_{mark:g}min.pth")
                self.snapshots.append({"mark_min": mark, "at_min": elapsed / 60, "steps": self.steps, "checkpoint": path.name})
            self.check_budget(elapsed)
            return out

        def on_epoch_end(self):
            super().on_epoch_end()
            self.epochs_run += 1
            elapsed = time.perf_counter() - self.t0
            fit = self.epochs_run + (self.budget_s - elapsed) / (elapsed / self.epochs_run)  # epochs the budget covers
            self.num_epochs = max(self.epochs_run + 1, math.ceil(fit))
            self.lr_scheduler.max_steps = self.num_epochs  # poly decay to ~0 at the end of the budget
            self.check_budget(elapsed)

        def check_budget(self, elapsed: float) -> None:
            """Stop when the next iteration (at the mean time per iteration so far) would end past the budget."""
            if elapsed + elapsed / self.steps > self.budget_s:
                self.train_s = elapsed
                raise BudgetSpent

        def snapshot(self, name: str) -> Path:
            """The weights in the checkpoint format ``nnUNetPredictor`` reads."""
            import torch

            path = Path(self.output_folder) / name
            torch.save({"network_weights": self.network.state_dict(), "trainer_name": "nnUNetTrainer",
                        "init_args": self.my_init_kwargs, "current_epoch": self.current_epoch,
                        "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes}, path)
            return path

        def run_training(self):
            try:
                super().run_training()
                self.train_s = time.perf_counter() - self.t0
            except BudgetSpent:
                self.on_train_end()
            if self.epochs_run:  # nothing to plot before the first epoch's end
                self.plot_progress(self.output_folder)

    return nnUNetTrainerWallClock


def train(dataset_name: str, configuration: str, *, minutes: float, marks_min=(), iters: int = 10, val_iters: int = 2,
          device: str = "auto") -> dict:
    """Train fold ``all`` of ``configuration`` for ``minutes``; returns steps, patches, voxels, seconds,
    the model folder and the checkpoints for the marks and the end."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from medseg.runtime import resolve_device

    pre = Path(nnUNet_preprocessed) / dataset_name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before building a trainer
    trainer_cls = budget_trainer(minutes, marks_min, iters, val_iters)
    trainer = trainer_cls(plans=plans, configuration=configuration, fold="all",
                          dataset_json=load_json(str(pre / "dataset.json")), device=resolve_device(device))
    trainer.run_training()
    trainer.snapshot("checkpoint_h2h_final.pth")
    cm = trainer.configuration_manager
    patches = trainer.steps * cm.batch_size
    return {"steps": trainer.steps, "epochs": trainer.epochs_run, "patches": patches, "batch_size": cm.batch_size,
            "patch_size": list(cm.patch_size), "spacing": list(cm.spacing), "voxels": patches * math.prod(cm.patch_size),
            "train_s": trainer.train_s,
            "precision": "fp16 autocast" if trainer.device.type == "cuda" else "fp32 (nnU-Net autocasts on CUDA only)",
            "model_dir": trainer.output_folder_base, "snapshots": trainer.snapshots, "final": "checkpoint_h2h_final.pth"}


def predict(model_dir: str | Path, checkpoint: str, images, out_dir: Path, device: str = "auto") -> dict:
    """``nnUNetPredictor`` (no TTA) over ``images`` (``(case, path)`` pairs) -> ``out_dir/<case>.nii.gz``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from medseg.runtime import resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=dev,
                                perform_everything_on_device=dev.type == "cuda", verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=("all",), checkpoint_name=checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(os.environ.get("nnUNet_def_n_proc", "1"))
    predictor.predict_from_files([[str(p)] for _, p in images], [str(out_dir / case) for case, _ in images],
                                 save_probabilities=False, overwrite=True, num_processes_preprocessing=n,
                                 num_processes_segmentation_export=n)
    return {"infer_s": time.perf_counter() - t0, "cases": len(images)}


def import_error() -> str | None:
    """``None`` when ``nnunetv2`` imports, else the reason a benchmark's nnU-Net row is skipped
    (:data:`NNUNET_MISSING`, or the error of an installed but broken package). Call it after
    :func:`set_environment`."""
    try:
        import nnunetv2  # noqa: F401
    except ModuleNotFoundError:
        return NNUNET_MISSING
    except Exception as err:  # installed but broken
        return f"skipped: nnunetv2 failed to import ({type(err).__name__}: {err})"
    return None


def untrained_model(dataset_name: str, configuration: str = "3d_fullres", *, seed: int = 0) -> dict:
    """An untrained model folder of ``configuration``, as training would leave it (fold ``all``).

    Needs :func:`set_environment` and :func:`plan_and_preprocess` first. ``nnUNetTrainer(...).initialize()``
    builds nnU-Net's own network from its plans (seeded with ``seed``); the trainer's own
    ``save_checkpoint`` writes ``fold_all/checkpoint_final.pth`` (random weights, the trainer's
    mirroring axes) and the plans and ``dataset.json`` are copied beside it, so that
    ``nnUNetPredictor.initialize_from_trained_model_folder(model_dir, ("all",))`` loads it.

    Returns:
        ``model_dir`` (str), ``patch_size``, ``spacing`` (of ``configuration``), ``mirror_axes``
        (the axes test-time mirroring flips) and ``parameters`` (the network's parameter count).
    """
    import shutil

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = Path(nnUNet_preprocessed) / dataset_name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before building a trainer
    torch.manual_seed(seed)
    trainer = nnUNetTrainer(plans=plans, configuration=configuration, fold="all",
                            dataset_json=load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    model_dir = Path(trainer.output_folder_base)
    shutil.copy(pre / "nnUNetPlans.json", model_dir / "plans.json")  # what on_train_start writes
    shutil.copy(pre / "dataset.json", model_dir / "dataset.json")
    cm = trainer.configuration_manager
    return {"model_dir": str(model_dir), "patch_size": [int(p) for p in cm.patch_size],
            "spacing": [float(s) for s in cm.spacing], "mirror_axes": list(trainer.inference_allowed_mirroring_axes or ()),
            "parameters": sum(p.numel() for p in trainer.network.parameters())}
