"""The stage contract: each stage declared once, run in process, child, pod or CLI."""
