"""The paper's published numbers (Tables 2, 3 and 5), the one place they are written, shown in the report
beside ours for reference. Its FID feature extractor differs from ours: compare the gap closed by RL and the
orderings, not the values."""

from __future__ import annotations

# FID per class (lower is better) of the VQGAN reconstruction (the limit), the standard and the RL model.
TABLE2 = {
    "brats2019": {
        "classes": ("HGG", "LGG", "All"),
        "vqgan": (25.82, 35.14, 24.64),
        "standard": (53.98, 62.28, 50.38),
        "rl": (40.11, 51.86, 38.05),
    },
    "oasis1": {
        "classes": ("AD", "CN", "All"),
        "vqgan": (33.81, 30.51, 29.42),
        "standard": (68.21, 60.70, 57.45),
        "rl": (61.88, 55.84, 52.92),
    },
}

# Downstream classification: (accuracy, F1, AUC), each (mean, std) over seeds.
TABLE3 = {
    "brats2019": {
        "real": ((0.59, 0.07), (0.67, 0.04), (0.65, 0.07)),
        "standard": ((0.62, 0.05), (0.68, 0.04), (0.65, 0.08)),
        "rl": ((0.71, 0.02), (0.71, 0.01), (0.74, 0.03)),
    },
    "oasis1": {
        "real": ((0.76, 0.03), (0.75, 0.04), (0.81, 0.01)),
        "standard": ((0.77, 0.03), (0.75, 0.03), (0.80, 0.02)),
        "rl": ((0.78, 0.04), (0.77, 0.03), (0.86, 0.06)),
    },
}
TABLE3_LABELS = {"real": "Real data only", "standard": "Standard synthetic", "rl": "Ours"}

# Ablations, on BraTS 2019 only: (configuration, FID All, accuracy).
TABLE5_DATASET = "brats2019"
TABLE5 = (
    ("Full framework", 38.05, 0.71),
    ("Sparse steps (1, 50, 99)", 47.05, 0.67),
    ("3D reward only", 43.92, 0.69),
)
# The experiments (conf/experiment/) of the ablation rows, in the paper's order.
TABLE5_EXPERIMENTS = ("ablation_sparse_steps", "ablation_3d_only")
