"""Distribution metrics for generated 3D volumes: FID with pluggable feature extractors, a real-statistics
cache, improved precision/recall, density/coverage and MS-SSIM diversity.

Values are only comparable when computed with the same extractor ``identity`` (name, options, seed,
weights) and the same volume size.
"""

from mrrl.metrics.diversity import ms_ssim_diversity, ms_ssim_settings
from mrrl.metrics.extractors import EXTRACTORS, VolumeFeatureExtractor, build_extractor, register_extractor
from mrrl.metrics.fid import VolumeFID
from mrrl.metrics.fid_report import compute_fid_report, compute_statistics, extract_features
from mrrl.metrics.precision_recall import density_coverage, knn_radii, prdc, precision_recall
from mrrl.metrics.pretrained import InceptionSliceExtractor, MedicalNetExtractor
from mrrl.metrics.statistics import FeatureAccumulator, FeatureStatistics, frechet_distance
from mrrl.metrics.stats_cache import RealStatsCache

__all__ = [
    "EXTRACTORS",
    "FeatureAccumulator",
    "FeatureStatistics",
    "InceptionSliceExtractor",
    "MedicalNetExtractor",
    "RealStatsCache",
    "VolumeFID",
    "VolumeFeatureExtractor",
    "build_extractor",
    "compute_fid_report",
    "compute_statistics",
    "density_coverage",
    "extract_features",
    "frechet_distance",
    "knn_radii",
    "ms_ssim_diversity",
    "ms_ssim_settings",
    "prdc",
    "precision_recall",
    "register_extractor",
]
