"""Task metrics that torchmetrics does not provide (torchmetrics ``Metric`` subclasses + functional cores)."""

from lightning_effnets.metrics.reid import ReIDMetric, ReIDScores, pairwise_distance, reid_retrieval_scores

__all__ = ["ReIDMetric", "ReIDScores", "pairwise_distance", "reid_retrieval_scores"]
