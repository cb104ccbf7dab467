"""Task pipelines built on the core: REC, region classification, point clouds, head analysis."""
