"""The experiment layer: training and evaluation from ml_collections
configs, workdirs, checkpoints, sweeps, reports, plots and the fgr-* tools.

Only this package reads configs; it calls the library (`fgr_tf`), never
the other way round.
"""
