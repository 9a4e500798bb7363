"""Launchers for multi-host training: TPU VM pods, XPK on GKE, SLURM GPU clusters, sweeps.

Each launcher is a script (`python3 launch/tpu_pod.py ...`) and an importable module whose
`main(argv)` returns an exit status; `--dry-run` prints the exact commands instead of running them.
"""
