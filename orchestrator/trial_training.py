"""What every trial trains and reports, whichever path runs it (``orchestrator.trial``: in the Tune trial
itself, or on a Ray Train worker group): ``dmkd.engine.fit`` from the last checkpoint, the figures of
every epoch with the best val AP so far, and a checkpoint folder holding ``checkpoint.pt``,
``metrics.json`` and, after the last epoch, the method's picture."""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray.train import Checkpoint as TrainCheckpoint
from ray.tune import Checkpoint as TuneCheckpoint

from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.config import TrainConfig
from dmkd.distillers import detector_family, method_parameters, picture_of
from dmkd.engine import Data, fit, load_data
from dmkd.metrics import BEST_VAL_AP, TRIAL_STARTED_AT, VAL_AP, read_metrics
from dmkd.pairing import build_distillation
from orchestrator.scratch import scratch_folder

PICTURE_PNG = "attention.png"


def _draw_picture(cfg: TrainConfig, data: Data, teacher, folder: Path) -> None:
    """The method's own picture of the run (DMKD: the teacher's attention and masks) on the first
    validation image, from the data and teacher the trial already holds; nothing for other methods."""
    picture = picture_of(cfg.method)
    if picture is None or teacher is None:
        return
    image, _ = data.val[0]
    device = next(teacher.parameters()).device
    features = {k: v.cpu() for k, v in teacher([image.to(device)]).items()}  # TeacherFeatures runs under no_grad
    params = {**method_parameters(cfg.method, detector_family(cfg.detector.arch)), **cfg.distill}
    picture(image, features, params, folder / PICTURE_PNG)


def train_and_report(config: dict, checkpoint: TrainCheckpoint | TuneCheckpoint | None, report: Callable,
                     rank: int = 0, *, checkpoint_class: type[TrainCheckpoint | TuneCheckpoint] = TrainCheckpoint,
                     recorded_epochs: Callable[[], set[int]] | None = None) -> None:
    """Train ``config["train"]`` (a TrainConfig as a dict) from ``checkpoint`` (the last one reported, when
    a trial is restarted or a sweep restored), calling ``report(metrics, checkpoint=...)`` after every epoch:
    ``ray.tune.report`` in a one-worker trial, ``ray.train.report`` on every rank of a Train worker group.
    ``checkpoint_class`` is the Checkpoint that ``report`` takes (Tune's and Train's are two classes).
    With ``config["picture"]`` the last epoch's checkpoint holds the method's picture (for W&B).

    A checkpoint of the last epoch means the trial trained to its end before; when ``recorded_epochs()``
    (the epochs the driver recorded for it) lacks that epoch, the driver stopped between storing the
    checkpoint and recording its report, and the report is made again from the checkpoint: with nothing
    reported, Tune would end the trial at the epoch before, unfinished for good."""
    started = time.time()
    picture = config["picture"]  # read first: a caller that leaves it out fails before training, not after
    with scratch_folder(rank) as local:  # removed at the end, with the checkpoint copy a resume trains from
        cfg = TrainConfig.from_dict({**config["train"], "out": str(local)})
        resume_from, resumed_epoch, best, final = None, 0, [], {}
        if checkpoint is not None:  # continue from the last epoch
            with checkpoint.as_directory() as folder:
                if (Path(folder) / CHECKPOINT_NAME).is_file():
                    recorded = read_metrics(folder)
                    resumed_epoch, final = recorded["final"]["epoch"], recorded["final"]
                    best = [e[VAL_AP] for e in recorded["epochs"] if VAL_AP in e]
                    if resumed_epoch >= cfg.epochs:
                        shutil.copytree(folder, local, dirs_exist_ok=True)  # to report again, picture included
                    else:
                        resume_from = local.with_name(local.name + "-resume.pt")  # beside, not inside, the folder
                        shutil.copy(Path(folder) / CHECKPOINT_NAME, resume_from)
        node = ray.get_runtime_context().get_node_id()

        def trial_figures(metrics: dict) -> dict:
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if best:
                metrics[BEST_VAL_AP] = max(best)  # the best epoch so far (its checkpoint may not be kept)
            metrics.update(resumed_from_epoch=resumed_epoch, node_id=node, **{TRIAL_STARTED_AT: started})
            return metrics

        if resumed_epoch >= cfg.epochs:  # trained to its end before: nothing to train
            if recorded_epochs is not None and resumed_epoch not in recorded_epochs():  # rank 0 holds checkpoints
                report(trial_figures(final), checkpoint=checkpoint_class.from_directory(str(local)) if rank == 0 else None)
            return
        data = load_data(cfg)  # loaded once: the loop and the picture share data and teacher
        teacher, distiller = build_distillation(cfg, data.train.num_classes) if cfg.method != "none" else (None, None)

        def on_epoch_end(epoch: int, metrics: dict, written: Path | None) -> None:
            if VAL_AP in metrics:
                best.append(metrics[VAL_AP])
            metrics = trial_figures(metrics)
            if written is None:
                report(metrics, checkpoint=None)
                return
            if epoch == cfg.epochs and picture:
                _draw_picture(cfg, data, teacher, local)
            report(metrics, checkpoint=checkpoint_class.from_directory(str(local)))

        fit(cfg, distiller=distiller, teacher=teacher, data=data, on_epoch_end=on_epoch_end, progress=False,
            resume_from=resume_from)
