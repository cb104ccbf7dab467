"""Task pipelines built on the core: REC, region classification, point clouds (their CLI is in falip.cli)."""
