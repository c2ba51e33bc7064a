"""``mrrl-dashboard``: a W&B workspace of the paper's panels, built from one declarative spec (mrrl.dashboard.spec)."""
