"""W&B tracking of the stages: run names, axes, summaries, tables, artefacts, and the keys each stage logs."""
