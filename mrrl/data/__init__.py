"""Data: dataset layouts, validation, preprocessing cache, splits, the phantom cohorts and the shared
DataModule (`datamodule.MRIDataModule`)."""
