"""Downstream classification (paper §4.3, Tables 3–4): does pre-training on synthetic volumes help?

- `model`: the MONAI 3D ResNet LightningModule, weight transfer, test predictions;
- `data`: synthetic-volume dataset, class weights, the small DataModule;
- `protocols`: the protocols (real only, standard, RL, extra generators) and their synthetic volumes;
- `runner`: one (protocol, seed) run — pre-train, fine-tune, test — resumable;
- `metrics`: accuracy / F1 / AUC, mean ± sample std over seeds, paired differences;
- `tables`: `table3.md`, `table3.csv`, `per_seed.csv`.

`mrrl stage=classify` (`mrrl.stages.classify`) puts them together. Package `__init__` files re-export
nothing: import a name from the module that defines it.
"""
