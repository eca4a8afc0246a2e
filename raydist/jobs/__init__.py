"""Cluster-facing code: job submission (Ray Jobs API) and the pipeline that chains the stages."""
