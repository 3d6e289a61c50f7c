"""Evaluation: zero-shot retrieval, classification and segmentation, PCA pictures.

Submodules: ``metrics`` (recall, accuracy, mIoU), ``zeroshot`` (TIPS protocol on embeddings),
``pca`` (PCA pictures of patch features), ``cli`` (``fasttips eval``). The iBOT ablation, which
trains and evaluates, is ``fasttips.ablate``.
"""
