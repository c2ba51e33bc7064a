"""Data: dataset layouts, validation, preprocessing cache, splits and the shared DataModule."""

from mrrl.data.datamodule import MRIDataModule, format_summary
from mrrl.data.layouts import DataProblem, DataValidationError, Subject

__all__ = ["DataProblem", "DataValidationError", "MRIDataModule", "Subject", "format_summary"]
