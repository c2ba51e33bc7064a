"""One Markdown report of everything an experiment produced: ``python -m mrrl.report <experiment_dir>``.

:func:`write_report` reads the stage manifests under ``<experiment_dir>`` (never a checkpoint: it is fast
and needs no GPU) and writes ``<experiment_dir>/report.md``, one module per part:

- :mod:`~mrrl.report.overview`: every stage's status, Table 1 (subjects per split and class);
- :mod:`~mrrl.report.models`: the VQGAN's reconstruction metrics, the diffusion model, the reward dataset
  (FID and reward per group, the FID-vs-steps plot) and the reward models (MSE, Spearman, pairwise ranking
  accuracy of R3D and R2D);
- :mod:`~mrrl.report.ppo`: PPO reward / KL (and FID-probe) curves, plotted from the CSV log into
  ``report_figures/ppo_curves.png``;
- :mod:`~mrrl.report.table2`: FID per class of the VQGAN limit, the standard and the RL model per
  extractor, the gap closed by RL as the evaluate stage computed it, the mid-slice figures;
- :mod:`~mrrl.report.table3`: classification mean ± std and paired differences;
- :mod:`~mrrl.report.table5`: when ablation experiments (``ablation_*`` beside this one in the same run
  root, made from this experiment) exist, FID "All" and accuracy of the full framework and every ablation;
- :mod:`~mrrl.report.paper`: the paper's published numbers, shown beside ours;
- :mod:`~mrrl.report.experiment`: the experiment folder (manifests through :mod:`mrrl.manifest`, in the
  order of the stage registry); :mod:`~mrrl.report.build`: the sections in order.

Tables are written with :mod:`mrrl.utils.markdown`. Stages that have not run are named with the command
that runs them; a partial experiment gives a partial report. ``mrrl-pipeline`` writes the report after its
last stage.
"""
