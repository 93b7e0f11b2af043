"""The UNICOM pipeline: CLIP features -> k-means pseudo-classes -> pretraining -> retrieval evaluation.

Steps (each a module with a ``main`` and a console script, configured by one YAML file with CLI overrides):

- :mod:`unicom.features`: open_clip image / text / joint features as ``.npy`` shards + an id index.
- :mod:`unicom.cluster`: faiss spherical k-means -> pseudo-labels, centroids and a size summary.
- :mod:`unicom.train`: a backbone + embedding head trained with :class:`unicom_kernels.DualPartialMarginLoss`.
- :mod:`unicom.evaluate`: Recall@K, mAP@R, mAP@100 with exact cosine search.
- :mod:`unicom.demo`: the whole chain on scikit-learn's handwritten digits, on one CPU.

Built on :mod:`unicom_kernels`; the kernel library never imports this package.
"""

__all__ = ["cluster", "config", "data", "demo", "evaluate", "features", "model", "train"]
