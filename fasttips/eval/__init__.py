"""Evaluation: zero-shot retrieval, classification and segmentation, PCA pictures, the iBOT ablation.

Submodules: ``metrics`` (recall, accuracy, mIoU), ``zeroshot`` (TIPS protocol on embeddings),
``pca`` (PCA pictures of patch features), ``cli`` (``fasttips eval``), ``ablate``
(``fasttips ablate ibot-vs-ibotpp``).
"""
