"""Seed experiments on a small byte-level Llama pretrained here from the shipped corpus.

Run `python -m bench.experiments.pretrain` first (the others run it when its model is missing),
then any of: forgetting, rank_sweep, target_modules, merged_vs_unmerged, two_adapters.
Each writes bench/results/exp-<name>-<machine>.json and .md (and .png when matplotlib is installed).
"""
