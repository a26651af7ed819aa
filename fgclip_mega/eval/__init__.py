from fgclip_mega.eval.metrics import evaluate, hard_negative_accuracy, recall_at_k

__all__ = ["evaluate", "hard_negative_accuracy", "recall_at_k"]
