"""Training from a config: `train_and_evaluate(config, workdir)`.

Writes into `workdir`:
  config.json      the resolved config;
  backup/          resumable state (weights, optimizer, epoch), so a killed
                   run started again with the same workdir resumes at its
                   last finished epoch;
  best.keras       the model with the best validation accuracy (written to
                   a temporary file, then renamed);
  final.keras      the model after the last epoch;
  history.csv      one row per epoch (appended across resumes);
  tensorboard/     TensorBoard logs.
"""

import os

import keras
import tensorflow as tf

from fgr_tf import attacks
from fgr_tf import callbacks as callbacks_lib
from fgr_tf import data as data_lib
from fgr_tf import distribute
from fgr_tf import errors
from fgr_tf import files
from fgr_tf import backbones
from fgr_tf.experiment import checkpoints
from fgr_tf.fgr_model import FGRModel

MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")


# The loss became NaN or Inf; the workdir keeps the last good state.
TrainingDiverged = errors.TrainingDiverged


def prepare_workdir(workdir):
  """Creates `workdir` or says clearly why it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"workdir {workdir!r} is not writable: {e}") from e


def load_splits(config):
  """(train arrays, validation arrays) as the config describes them."""
  kwargs = dict(source=config.data.source or None,
                data_dir=config.data.data_dir or None)
  # -1 = all: `data.load`'s rule, shared with `evaluation.evaluate_workdir`.
  train = data_lib.load(config.data.name, "train",
                        num_examples=config.data.num_train_examples,
                        **kwargs)
  val = data_lib.load(config.data.name, "test",
                      num_examples=config.data.num_val_examples, **kwargs)
  return train, val


def learning_rate_schedule(config, steps_per_epoch):
  """Piecewise-constant: x lr_decay_factor at each of lr_decay_epochs."""
  boundaries = [int(e * steps_per_epoch) for e in config.train.lr_decay_epochs]
  values = [config.train.learning_rate * config.train.lr_decay_factor ** i
            for i in range(len(boundaries) + 1)]
  if not boundaries:
    return config.train.learning_rate
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_adversary(config):
  """The adversarial-training callable the config's `adv` section names.

  `adv.attack` is "" (off) or the name of an attack that can train
  (`fgr_tf.attacks.REGISTRY`: flow_pgd, stadv, worst_of_k, random_flow).
  Its settings are the `adv` fields it takes (flow_pgd: epsilon, steps,
  random_start; stadv: tau, steps, search_steps; worst_of_k: grid, tries;
  random_flow: epsilon, tries); the first round(`adv.clean_fraction` *
  batch) examples of each (per-replica) batch stay clean (Madry-style
  mixing; 0 = all adversarial).

  Returns:
    None, or `adversary(backbone, images, labels, seed) -> images` for
    `FGRModel(adversary=...)`.
  """
  adv = config.adv
  if not adv.attack:
    return None
  training = sorted(n for n, i in attacks.REGISTRY.items() if i.trains)
  if adv.attack not in training:
    raise errors.UserError(f"Unknown adversarial-training attack "
                           f"{adv.attack!r}. Expected '' or one of "
                           f"{training}.")
  known = attacks.defaults(adv.attack)
  settings = {k: v for k, v in adv.items()
              if k in known and k not in ("seed", "jit_compile")}
  return attacks.adversary(attacks.make(adv.attack, **settings),
                           adv.clean_fraction)


def build_model(config, input_shape, num_classes, steps_per_epoch):
  """Backbone + FGRModel, compiled (call inside the strategy's scope)."""
  backbone = backbones.build(
      config.model.name, num_classes, input_shape,
      weight_decay=config.model.weight_decay,
      sync_batchnorm=config.model.sync_batchnorm)
  model = FGRModel(backbone, fgr_lambda=config.fgr.lam,
                   rs_sigma=config.fgr.rs_sigma, igr_lambda=config.igr.lam,
                   adversary=make_adversary(config), seed=config.seed,
                   allow_tf32=config.allow_tf32)
  optimizer = keras.optimizers.SGD(
      learning_rate_schedule(config, steps_per_epoch),
      momentum=config.train.momentum)
  if config.mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  model.compile(optimizer=optimizer, metrics=["accuracy"],
                jit_compile=config.jit_compile)
  return model


def train_and_evaluate(config, workdir):
  """Trains as `config` says, resuming from `workdir` if it holds a backup.

  Returns:
    The Keras History of this invocation (its epochs only).

  Raises:
    ValueError: bad settings or data; FileNotFoundError: missing data.
    TrainingDiverged: the loss became NaN/Inf (nothing good is overwritten).
  """
  if config.mixed_precision not in MIXED_PRECISION:
    raise errors.UserError(
        f"Unknown mixed_precision {config.mixed_precision!r}. Expected one "
        f"of {MIXED_PRECISION}.")
  prepare_workdir(workdir)
  files.write_text(os.path.join(workdir, "config.json"),
                   config.to_json_best_effort(indent=2))
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  if config.mixed_precision:
    keras.mixed_precision.set_global_policy(config.mixed_precision)

  (train_x, train_y), (val_x, val_y) = load_splits(config)
  strategy = distribute.get_strategy(config.strategy)
  batch = config.train.batch_size
  if batch % strategy.num_replicas_in_sync:
    raise errors.UserError(
        f"train.batch_size={batch} is not divisible by the "
        f"{strategy.num_replicas_in_sync} replicas of the strategy.")
  train_ds = data_lib.make_dataset(train_x, train_y, batch, train=True,
                                   dataset_name=config.data.name,
                                   augment_data=config.data.augment,
                                   seed=config.seed)
  val_ds = data_lib.make_dataset(val_x, val_y, batch, train=False)
  steps_per_epoch = -(-len(train_x) // batch)
  num_classes = data_lib.NUM_CLASSES[config.data.name]
  with strategy.scope():
    model = build_model(config, train_x.shape[1:], num_classes,
                        steps_per_epoch)

  stop_on_nan = checkpoints.StopOnNaN()
  callbacks = [
      stop_on_nan,
      # Kept after the last epoch: re-running a finished workdir is a no-op.
      checkpoints.NaNSafeBackupAndRestore(os.path.join(workdir, "backup"),
                                            double_checkpoint=True,
                                            delete_checkpoint=False),
  ]
  periodic = config.eval.callback
  if periodic.every_n_epochs > 0:
    n = periodic.num_examples
    callbacks.append(callbacks_lib.RobustnessEvaluation(
        data_lib.to_unit_float(val_x[:n]).numpy(), val_y[:n],
        {name: dict(settings) for name, settings in periodic.attacks.items()},
        every_n_epochs=periodic.every_n_epochs,
        budgets_px=tuple(periodic.budgets_px)))
  callbacks += [
      checkpoints.AtomicBestCheckpoint(os.path.join(workdir, "best.keras"),
                                         monitor="val_accuracy"),
      keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"),
                                append=True),
      keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")),
  ]
  history = model.fit(train_ds, validation_data=val_ds,
                      epochs=config.train.epochs, callbacks=callbacks,
                      verbose=config.train.verbose, shuffle=False)
  if stop_on_nan.nan_epoch is not None:
    raise TrainingDiverged(
        f"Training stopped: the loss became NaN or Inf in epoch "
        f"{stop_on_nan.nan_epoch + 1}, batch {stop_on_nan.nan_batch}. The "
        f"last good state is kept in {workdir} (backup/ resumes from the "
        "last finished epoch; best.keras). Lower train.learning_rate or "
        "fgr.lam / igr.lam, or use mixed_precision=''.")
  checkpoints.save_atomically(model, os.path.join(workdir, "final.keras"))
  files.write_json({"epochs_this_run": len(history.epoch),
                    "last_epoch": (history.epoch[-1] + 1) if history.epoch
                                  else None},
                   os.path.join(workdir, "train_summary.json"))
  return history
