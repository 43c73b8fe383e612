"""The cluster simulator's parts (bench/simulate.py is the command): calibration, arrival traces, the cluster."""
