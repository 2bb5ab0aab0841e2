"""Training-free structured pruning of micro-experts (CAMERA-P): `moefold prune`.

scoring.py  per-unit scores of one MoE layer (CAMERA energy, weight magnitude, random)
apply.py    layer-by-layer calibration, per-layer ranking, zeroing removed units
pack.py     live units first, stored widths shrunk to the widest live expert
command.py  the CLI: checkpoint -> calibration tokens -> pruned checkpoint + prune.json
"""
