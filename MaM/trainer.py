"""``nnUNetTrainerMissingReconBaseline``: MaM's recipe as a subclass of the pinned nnU-Net v2 trainer.

Everything nnU-Net does stays nnU-Net's (data loading, augmentation, region targets, deep-supervision pyramids, SGD,
poly LR, AMP, gradient clipping, checkpoints, resume); this class only adds what MaM changes:

- the network is :class:`MaM.model.MultimodalRecon`, built from the plans entry ``3d_fullres_multiencoder_recon``;
- every training iteration draws one of the 15 scenarios uniformly (``random.choice``, in canonical terms) and gives
  its mask, translated to the nnU-Net channel order FLAIR, T1, T1ce, T2, to the network;
- loss = deep-supervised DC+BCE (nnU-Net's) + ``recon_weight`` × bottleneck reconstruction MSE;
- validation only at upstream's epochs, each validation patch under its case's scenario from ``val15splits.csv``
  (read in canonical order, so T1 and T1ce are no longer swapped as upstream's were); ``checkpoint_best.pth`` follows
  the mean pseudo-Dice of the three regions; ``checkpoint_latest.pth`` is written every epoch;
- the final validation predicts every validation case under its CSV scenario (mirroring off, Gaussian blending);
- checkpoints are read with the weights-only reader of :mod:`MaM.trained_model` (nnU-Net's own loaders unpickle any
  object, so a hostile file could run code), for ``--c``, ``--val``, ``--val_best`` and ``-pretrained_weights``.

torch.compile is off unless ``nnUNet_compile=1`` is set: the graph depends on the mask.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch import distributed as dist

from brats_core.data.splits import CSV_CYCLE, read_mask_csv
from brats_core.modalities import SCENARIOS, Mask, from_canonical
from brats_core.utils.checkpoint import StateDictMismatchError, load_state_dict_strict, unwrap
from brats_core.utils.io import atomic_path
from MaM.model import NATIVE_ORDER, MaMConfig, MultimodalRecon, reconstruction_loss
from MaM.prepare_dataset import VAL_CSV, with_brats_region_order
from MaM.trained_model import load_nnunet_checkpoint

UPSTREAM_VAL_EPOCHS: tuple[int, ...] = (
    20, 50, 70, 100, 120, 150, 200, 250, 300, 350, 370, 390, 400, 420, 450, 460, 470, 480, 485, 490, 495, 499,
)  # fmt: skip
"""0-based epochs at which upstream validates."""


_CUDA = torch.device("cuda")  # nnU-Net's default device, kept in the overridden signature

RESUME_KEYS: tuple[str, ...] = (
    "network_weights", "optimizer_state", "logging", "_best_ema", "current_epoch", "init_args", "trainer_name",
)  # fmt: skip
"""Entries of nnU-Net's ``checkpoint_*.pth`` that resuming (``--c``) and ``--val`` need."""
SEGMENTATION_HEADS = ".seg_layers."
"""Keys of the output layers, which nnU-Net's pretrained-weights transfer leaves freshly initialised."""


def load_pretrained_weights(network: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """nnU-Net's ``load_pretrained_weights`` on weights already read safely: every weight of ``network`` except the
    segmentation heads (``.seg_layers.``) is taken from ``weights``, which must hold it with the same shape.

    Raises:
        StateDictMismatchError: a weight is missing or mis-shaped (one line naming ``source`` and the first keys).
    """
    model = unwrap(network)
    own = model.state_dict()
    body = [k for k in own if SEGMENTATION_HEADS not in k]
    missing = [k for k in body if k not in weights]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in body
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if missing or shapes:
        problems = (("missing", missing), ("mis-shaped", shapes))
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in problems if keys]
        raise StateDictMismatchError(
            f"pretrained weights {source} do not fit this network: {'; '.join(parts)}; give a checkpoint of the "
            "same plans configuration"
        )
    model.load_state_dict({**own, **{k: weights[k] for k in body}})


def native_masks(masks: Sequence[Mask], device: torch.device | str | None = None) -> torch.Tensor:
    """Canonical masks → ``(B, 4)`` bool tensor in MaM's channel order."""
    return torch.tensor([from_canonical(m, NATIVE_ORDER) for m in masks], dtype=torch.bool, device=device)


class ScenarioNetwork(nn.Module):
    """One-argument view of a MultimodalRecon for nnU-Net's predictor: ``forward(x)`` with a fixed scenario.

    ``x`` is in nnU-Net's (MaM) channel order; :meth:`set_mask` takes the scenario in canonical order.
    """

    def __init__(self, network: nn.Module, mask: Mask = (True, True, True, True)) -> None:
        super().__init__()
        self.network = network
        self.set_mask(mask)

    def set_mask(self, mask: Mask) -> None:
        self.native_mask = native_masks([mask])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 4, D, H, W)`` → region logits ``(B, 3, D, H, W)`` (WT, TC, ET)."""
        mask = self.native_mask.to(x.device).expand(x.shape[0], -1)
        return self.network(x, mask, native=True, full_output=False)


class nnUNetTrainerMissingReconBaseline(nnUNetTrainer):  # noqa: N801 - upstream's class name, used in result folders
    """MaM's nnU-Net trainer (see the module docstring). Attributes set after construction override the recipe."""

    def __init__(
        self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = _CUDA
    ) -> None:
        # nnU-Net writes predictions with regions_class_order; make it produce BraTS labels whatever the dataset.json.
        dataset_json = with_brats_region_order(dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 500
        self.num_iterations_per_epoch = 150
        self.num_val_iterations_per_epoch = 125
        # With batch 1 nnU-Net's rounding of 0.5 forces a foreground patch for every sample.
        self.oversample_foreground_percent = 0.5
        self.save_every = 1  # checkpoint_latest.pth every epoch, as upstream
        self.recon_weight = 1.0
        self.scenario_rng = random.Random()
        self.validation_epochs: set[int] | None = None  # None: upstream's list plus the last epoch
        self.val_csv: str | None = None  # None: <nnUNet_preprocessed>/<dataset>/val15splits.csv
        self.final_validation_mask: Mask | None = None  # one scenario for every case (upstream -mask); None: CSV
        self._val_masks: dict[str, Mask] | None = None

    # ------------------------------------------------------------------------------------------------ network

    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """MultimodalRecon from the configuration's ``arch_kwargs`` and patch size."""
        if num_input_channels != 4:
            raise ValueError(f"MaM needs the 4 BraTS channels, the dataset has {num_input_channels}")
        config = MaMConfig.from_arch_kwargs(
            configuration_manager.network_arch_init_kwargs, configuration_manager.patch_size, num_output_channels
        )
        config.deep_supervision = enable_deep_supervision
        return MultimodalRecon(config)

    def _do_i_compile(self) -> bool:
        return self.device.type == "cuda" and super()._do_i_compile() and _env_compile_requested()

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file beside ``filename`` and renamed when complete, so that a
        run killed while saving never leaves a truncated ``checkpoint_*.pth`` (nnU-Net writes in place)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (or logs that checkpointing is disabled)
            return
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))

    def load_checkpoint(self, filename_or_checkpoint: Mapping | str, source: str | None = None) -> None:
        """Resume from a checkpoint file or an already loaded one (nnU-Net's semantics), the file read weights-only.

        nnU-Net 2.8.1's own method unpickles the file with ``weights_only=False`` (a hostile file runs code) and
        fails on a dict, so the state is restored here, as nnU-Net does. ``source`` names a dict's file in errors.
        """
        if isinstance(filename_or_checkpoint, Mapping):
            checkpoint = filename_or_checkpoint
        else:
            checkpoint = load_nnunet_checkpoint(filename_or_checkpoint, RESUME_KEYS)
            source = source or str(filename_or_checkpoint)
        if not self.was_initialized:
            self.initialize()
        load_state_dict_strict(self.network, checkpoint["network_weights"], source or "checkpoint")  # strips module.
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes
        )
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    # ------------------------------------------------------------------------------------------------ scenarios

    def draw_scenario(self) -> Mask:
        """One of the 15 scenarios, uniformly (canonical order)."""
        return self.scenario_rng.choice(SCENARIOS).mask

    def validation_masks(self) -> dict[str, Mask]:
        """Case → canonical scenario for every validation case, from ``val15splits.csv`` (IM-Fuse order).

        Cases the CSV lacks (e.g. ``fold all``) get scenarios in the CSVs' cycling order, with a log message.
        """
        if self._val_masks is None:
            _, val_keys = self.do_split()
            path = Path(self.val_csv or join(self.preprocessed_dataset_folder_base, VAL_CSV))
            masks: dict[str, Mask] = dict(read_mask_csv(path, allow_empty=True)) if path.is_file() else {}
            missing = sorted(k for k in val_keys if k not in masks)
            if missing:
                self.print_to_log_file(
                    f"{len(missing)} validation case(s) have no scenario in {path} (e.g. {missing[0]}); they cycle "
                    "through the 15 scenarios instead"
                )
                for i, k in enumerate(missing):
                    masks[k] = tuple(c == "1" for c in CSV_CYCLE[i % 15])  # type: ignore[assignment]
            self._val_masks = masks
        return self._val_masks

    def is_validation_epoch(self, epoch: int) -> bool:
        epochs = self.validation_epochs
        if epochs is None:
            epochs = {e for e in UPSTREAM_VAL_EPOCHS if e < self.num_epochs} | {self.num_epochs - 1}
        return epoch in epochs

    # ------------------------------------------------------------------------------------------------ steps

    def _compute_loss(self, output, target, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = output.seg if isinstance(output.seg, list | tuple) else [output.seg]
        target = target if isinstance(target, list | tuple) else [target]
        rec = reconstruction_loss(output, mask)
        return self.loss(seg, target) + self.recon_weight * rec, rec

    def _batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """The batch's image and (deep-supervision list of) targets on the trainer's device."""
        target = batch["target"]
        if isinstance(target, list):
            return batch["data"].to(self.device, non_blocking=True), [
                t.to(self.device, non_blocking=True) for t in target
            ]
        return batch["data"].to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        mask = native_masks([self.draw_scenario()] * data.shape[0], self.device)  # one scenario per iteration
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data, mask, native=True, full_output=True)
            loss, rec = self._compute_loss(output, target, mask)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "recon_loss": rec.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        rec = collate_outputs(train_outputs)["recon_loss"]
        self.print_to_log_file("reconstruction loss", np.round(float(np.mean(rec)), decimals=4))

    def validation_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        val_masks = self.validation_masks()
        mask = native_masks([val_masks[k] for k in batch["keys"]], self.device)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data, mask, native=True, full_output=True)
            loss, _ = self._compute_loss(output, target, mask)
        logits = output.seg[0] if isinstance(output.seg, list | tuple) else output.seg
        target0 = target[0] if isinstance(target, list | tuple) else target
        axes = [0, *range(2, logits.ndim)]
        predicted = (torch.sigmoid(logits) > 0.5).long()
        mask_ignore = None
        if self.label_manager.has_ignore_label:
            mask_ignore = ~target0[:, -1:] if target0.dtype == torch.bool else 1 - target0[:, -1:]
            target0 = target0[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target0, axes=axes, mask=mask_ignore)
        return {
            "loss": loss.detach().cpu().numpy(),
            "tp_hard": tp.detach().cpu().numpy(),
            "fp_hard": fp.detach().cpu().numpy(),
            "fn_hard": fn.detach().cpu().numpy(),
        }

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        local = self.logger.local_logger.my_fantastic_logging
        if math.isnan(local["ema_fg_dice"][self.current_epoch]):  # the first validation after NaN placeholders
            local["ema_fg_dice"][self.current_epoch] = local["mean_fg_dice"][self.current_epoch]

    def _log_no_validation(self) -> None:
        """nnU-Net's logger wants one value per epoch: NaN placeholders, the EMA carried forward."""
        local = self.logger.local_logger
        e = self.current_epoch
        local.log("mean_fg_dice", math.nan, e)
        local.log("ema_fg_dice", local.get_value("ema_fg_dice", e - 1) if e > 0 else math.nan, e)
        local.log("dice_per_class_or_region", [math.nan] * self.label_manager.num_segmentation_heads, e)
        local.log("val_losses", math.nan, e)

    # ------------------------------------------------------------------------------------------------ loop

    def on_train_start(self) -> None:
        super().on_train_start()
        self.validation_masks()  # fail early on an unreadable CSV

    def on_epoch_end(self) -> None:
        e = self.current_epoch
        self.logger.log("epoch_end_timestamps", time(), e)
        self.print_to_log_file("train_loss", np.round(self.logger.get_value("train_losses", step=-1), decimals=4))
        validated = not math.isnan(self.logger.get_value("mean_fg_dice", step=-1))
        if validated:
            self.print_to_log_file("val_loss", np.round(self.logger.get_value("val_losses", step=-1), decimals=4))
            self.print_to_log_file(
                "Pseudo dice", [np.round(i, decimals=4) for i in self.logger.get_value("dice_per_class_or_region", -1)]
            )
        start, end = (self.logger.get_value(k, step=-1) for k in ("epoch_start_timestamps", "epoch_end_timestamps"))
        self.print_to_log_file(f"Epoch time: {np.round(end - start, decimals=2)} s")
        if (e + 1) % self.save_every == 0 and e != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        # Best checkpoint by the mean pseudo-Dice of the three regions at validation epochs (upstream), not nnU-Net's
        # EMA; _best_ema is reused to hold it because nnU-Net saves and restores that field.
        if validated:
            score = float(self.logger.get_value("mean_fg_dice", step=-1))
            if self._best_ema is None or score > self._best_ema:
                self._best_ema = score
                self.print_to_log_file(f"New best pseudo Dice: {np.round(score, decimals=4)}")
                self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def run_training(self) -> None:
        self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            if self.is_validation_epoch(epoch):
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [
                        self.validation_step(next(self.dataloader_val))
                        for _ in range(self.num_val_iterations_per_epoch)
                    ]
                    self.on_validation_epoch_end(val_outputs)
            else:
                self._log_no_validation()
            self.on_epoch_end()
        self.on_train_end()

    # ------------------------------------------------------------------------------------------------ final val

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Predict every validation case under its scenario (mirroring off) and score with nnU-Net's evaluator."""
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        wrapper = ScenarioNetwork(self.network)
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=True,
            device=self.device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
        )  # fmt: skip
        predictor.manual_initialization(
            wrapper, self.plans_manager, self.configuration_manager, None, self.dataset_json,
            self.__class__.__name__, self.inference_allowed_mirroring_axes,
        )  # fmt: skip
        out_dir = join(self.output_folder, "validation")
        maybe_mkdir_p(out_dir)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank :: dist.get_world_size()]
        masks = self.validation_masks()
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        for k in dataset_val.identifiers:
            data, _, _, properties = dataset_val.load_case(k)
            mask = self.final_validation_mask or masks[k]
            wrapper.set_mask(mask)
            self.print_to_log_file(f"predicting {k} with {''.join('1' if m else '0' for m in mask)} (canonical)")
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:]))).cpu()
            export_prediction_from_logits(
                logits, properties, self.configuration_manager, self.plans_manager, self.dataset_json,
                join(out_dir, k), save_probabilities,
            )  # fmt: skip
        if self.is_ddp:
            dist.barrier()
        if self.local_rank == 0:
            metrics = compute_metrics_on_folder(
                join(self.preprocessed_dataset_folder_base, "gt_segmentations"), out_dir, join(out_dir, "summary.json"),
                self.plans_manager.image_reader_writer_class(), self.dataset_json["file_ending"],
                self.label_manager.foreground_regions, self.label_manager.ignore_label, chill=True,
                num_processes=max(1, min(default_num_processes, len(val_keys))),
            )  # fmt: skip
            self.print_to_log_file("Validation complete", also_print_to_console=True)
            self.print_to_log_file("Mean Validation Dice: ", metrics["foreground_mean"]["Dice"])
        self.set_deep_supervision_enabled(True)
        compute_gaussian.cache_clear()


def _env_compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")  # noqa: SIM112
