"""The UNICOM pipeline: CLIP features -> k-means pseudo-classes -> pretraining -> retrieval evaluation.

Built on :mod:`unicom_kernels`. The pipeline steps are not implemented yet (see README,
"Not done yet"); this package exists so the install layout is final.
"""
