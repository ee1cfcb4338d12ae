"""``dsmoe.app``: the top layer — the commands (:mod:`.cli`) and what they run: generation
(:mod:`.generate`), inspection (:mod:`.inspection`), devices (:mod:`.device`) and CUDA-graph
replay (:mod:`.cuda_graphs`). It imports every stage below it; nothing below imports it.
"""
