"""Distribution metrics for generated 3D volumes: FID with pluggable feature extractors, KID, a real-statistics
cache, bootstrap intervals, improved precision/recall, density/coverage and MS-SSIM diversity.

Values are only comparable when computed with the same extractor `identity` (name, options, seed,
weights) and the same volume size.
"""
