"""Synthetic cohorts other tools can read: NIfTI in the dataset's layout, labels, provenance, model card."""
