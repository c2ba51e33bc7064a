"""Small shared utilities (atomic file writes, manifests, seeding)."""
