"""Paper Table 2: which models an experiment can evaluate, their volumes, their scores, the tables.

- `sources`: the rows (VQGAN reconstruction, standard diffusion, RL fine-tuned, extra models) found from
  the stage manifests, and their volumes, generated once and cached as `.npy`;
- `scores`: real test-set features, FID, precision/recall/density/coverage and MS-SSIM diversity;
- `real_sets`: the real volumes of one class and split and their cached statistics;
- `calibration`: the ladder and synthetic-trajectory premises; `judge`: the held-out headline extractor;
- `tables`: `table2.md` / `table2.csv` and the mid-slice figures.

`mrrl stage=evaluate` (`mrrl.stages.evaluate`) puts them together.
"""
