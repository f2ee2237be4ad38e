"""What operators look at before, during and after a run: preflight, backup, audit, the mapping
document, status, reports and figures."""
