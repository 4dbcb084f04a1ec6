"""Reports from an experiment's stored results: paper-style tables with paired, corrected statistics, a
sweep's leaderboard, the teacher/student pair, plots, CSV/JSON and a W&B summary run.

    python -m orchestrator.report experiments/ablation [--out DIR]

Reads the experiment folder that a sweep or an ablation wrote: Tune's per-trial ``params.json`` and
``result.json``, ``sweep.json`` / ``ablation.json``, ``teacher.json``, ``reference.json`` and the Optuna
studies. ``records`` reads them, ``stats`` tests, ``ablation`` and ``sweep`` make the two kinds of table,
``search`` tells how the studies searched, ``pair`` and ``plots`` add the rest, ``publish`` writes it all.
"""
