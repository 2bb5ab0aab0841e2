"""`moefold plan`: an analytical planner that ranks parallel layouts by predicted step time.

hardware.py (device and network specs), cost.py (compute, communication, bubble and memory of
one candidate), search.py (enumeration with or without folding, node placement, ranking) and
command.py (the sub-command and its table / JSON output). docs/planner.md documents the model.
"""
