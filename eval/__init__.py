"""Evaluation harness for hf_marconi: workload traces, replay sweeps and reports (``python -m eval --help``)."""
