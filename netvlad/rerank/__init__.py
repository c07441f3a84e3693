"""Re-ranking the shortlist of a global search with local evidence: local features and their
geometric verification, patch descriptors, query expansion, and the per-photo evidence store of
an index folder (DESIGN.md §8)."""
