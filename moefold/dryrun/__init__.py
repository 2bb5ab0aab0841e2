"""`moefold dry-run`: one real training step of any rank of an N-rank job in this process,
with torch's fake process group and fake tensors (docs/dry_run.md)."""
