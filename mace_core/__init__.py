"""MACE (Mass Concept Erasure, Lu et al., CVPR 2024) on plain tensors.

Nothing in this package imports ComfyUI: the nodes hand it tensors and a text-encoding function, and turn what it
returns (weight deltas for the cross-attention key/value projections) into patches on a cloned MODEL.
"""
